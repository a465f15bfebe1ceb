/**
 * Redis memory per finished upload (run by hand: `npm run bench:memory`, optional `-- --jobs N`).
 * Runs N uploads as one batch through the real API, worker and KMS emulator, then sums MEMORY USAGE of every
 * key under the run's prefix (job records, event streams, batch keys, uploaded keys, BullMQ's trimmed job
 * data) and prints bytes per job and per 10,000 jobs. Uses REDIS_URL under a throw-away prefix.
 */
import { parseArgs } from 'node:util';
import { Redis } from 'ioredis';
import { Keyspace } from '../shared/stores/keyspace.js';
import { seedKms, seedLocalKey, startStack } from '../test/helpers/stack.js';

const { values } = parseArgs({ options: { jobs: { type: 'string', default: '10000' } } });
const N = Number(values.jobs);

const stack = await startStack({ name: 'bench-memory', env: { LOG_LEVEL: 'silent', WORKER_CONCURRENCY: '16', INTAKE_BURST: '1000000' } });
const redis = new Redis(stack.config.REDIS_URL);
try {
  const token = await stack.token('bench');
  await seedKms(stack, token);
  await seedLocalKey(stack, token, 'test-key');
  const items = Array.from({ length: N }, (_, i) => ({ source_key_identifier: 'test-key', region: 'ap-south-1', kms: 'kms', aws_param: { Alias: `mem-${i}`, Tags: [{ TagKey: 'team', TagValue: 'bench' }] } }));
  const t0 = performance.now();
  const res = await stack.call('POST', '/api/v1/cckm/aws/upload-key/batch', { token, body: { items } });
  if (res.status !== 202) throw new Error(`batch answered ${res.status}`);
  for (;;) {
    const b = await stack.call('GET', `/api/v1/batches/${res.body.id}`, { token });
    if (b.body.status === 'completed') {
      console.log(`counts: ${JSON.stringify(b.body.counts)}`);
      break;
    }
    await new Promise((r) => setTimeout(r, 500));
  }
  const seconds = (performance.now() - t0) / 1000;

  let bytes = 0;
  let keys = 0;
  const byKind = new Map<string, number>();
  for (const pattern of new Keyspace(stack.config.KEYFERRY_PREFIX).patterns) {
    let cursor = '0';
    do {
      const [next, found] = await redis.scan(cursor, 'MATCH', pattern, 'COUNT', 1000);
      cursor = next;
      for (const key of found) {
        const size = Number((await redis.memory('USAGE', key)) ?? 0);
        bytes += size;
        keys++;
        const kind = key.replace(/\{[^}]*\}/g, '{}').replace(/:[0-9a-f-]{36}(\.\d+)?/g, ':<id>').replace(/:\d+(?=:events$|$)/, ':<n>');
        byKind.set(kind, (byKind.get(kind) ?? 0) + size);
      }
    } while (cursor !== '0');
  }
  console.log(`${N} uploads finished in ${seconds.toFixed(1)} s (${(N / seconds).toFixed(0)} uploads/s, one worker, emulator without latency)`);
  for (const [kind, size] of [...byKind].sort((a, b) => b[1] - a[1]).slice(0, 8)) console.log(`  ${kind}: ${(size / N).toFixed(0)} bytes per job`);
  console.log(`Redis: ${keys} keys, ${(bytes / 1048576).toFixed(1)} MiB, ${(bytes / N).toFixed(0)} bytes per finished job, ${((bytes / N) * 10_000 / 1048576).toFixed(1)} MiB per 10,000`);
} finally {
  redis.disconnect();
  await stack.close();
}

// Something (a BullMQ or SDK handle) may keep the event loop alive after the clean-up: end the run explicitly.
process.exit(0);
