/**
 * Batch intake benchmark (run by hand: `npm run bench:batch`, optional `-- --items N --runs R`).
 * Times POST /api/v1/cckm/aws/upload-key/batch with N items (no worker running, so only intake is
 * measured) next to a raw BullMQ addBulk of the same N payloads in the same run, and prints the ratio.
 * Uses the Redis at REDIS_URL under a throw-away prefix, deleted at the end.
 */
import { parseArgs } from 'node:util';
import { Queue } from 'bullmq';
import { Redis } from 'ioredis';
import { startApi } from '../api/server.js';
import { signToken } from '../shared/auth.js';
import { loadConfig } from '../shared/config.js';
import { createLogger } from '../shared/logger.js';
import { deleteKeyspace } from '../shared/stores/keyspace.js';
import { testEnv } from '../test/helpers/stack.js';
import { median } from './lib-bench.js';

const { values } = parseArgs({ options: { items: { type: 'string', default: '10000' }, runs: { type: 'string', default: '5' } } });
const N = Number(values.items);
const RUNS = Number(values.runs);

const config = loadConfig(testEnv('bench-batch', { REDIS_URL: process.env.REDIS_URL ?? 'redis://127.0.0.1:6379', LOG_LEVEL: 'silent', INTAKE_BURST: '1000' }));
const prefix = config.KEYFERRY_PREFIX;
const api = await startApi(config, createLogger('silent'));
const redis = new Redis(config.REDIS_URL);
const token = await signToken({ secret: config.JWT_SECRET, account: 'bench' });
const post = (path: string, body: unknown) =>
  fetch(`${api.url}${path}`, { method: 'POST', headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' }, body: JSON.stringify(body) });

try {
  await post('/api/v1/cckm/aws/kms', { name: 'kms', account_id: '123456789012', regions: ['ap-south-1'], endpoint: 'http://127.0.0.1:1' });
  await post('/api/v1/vault/keys2', { name: 'test-key' });
  const items = Array.from({ length: N }, (_, i) => ({ source_key_identifier: 'test-key', region: 'ap-south-1', kms: 'kms', aws_param: { Alias: `bench-${i}`, Tags: [{ TagKey: 'team', TagValue: 'bench' }] } }));

  const keyferry: number[] = [];
  for (let r = 0; r < RUNS; r++) {
    const t0 = performance.now();
    const res = await post('/api/v1/cckm/aws/upload-key/batch', { items });
    await res.text();
    if (res.status !== 202) throw new Error(`batch answered ${res.status}`);
    keyferry.push(performance.now() - t0);
  }

  const raw: number[] = [];
  const queue = new Queue('raw-bench', { connection: redis, prefix: `{${prefix}}` });
  for (let r = 0; r < RUNS; r++) {
    const t0 = performance.now();
    await queue.addBulk(items.map((data, i) => ({ name: 'upload-key', data, opts: { jobId: `r${r}.${i}`, priority: 100 } })));
    raw.push(performance.now() - t0);
  }
  await queue.close();

  const k = median(keyferry);
  const b = median(raw);
  console.log(`batch intake, ${N} items, median of ${RUNS} runs (node ${process.version})`);
  console.log('| what | median ms | all runs ms |');
  console.log('|---|---|---|');
  console.log(`| keyferry POST …/upload-key/batch (validate, record, addBulk) | ${k.toFixed(0)} | ${keyferry.map((x) => x.toFixed(0)).join(', ')} |`);
  console.log(`| raw BullMQ addBulk of the same payloads | ${b.toFixed(0)} | ${raw.map((x) => x.toFixed(0)).join(', ')} |`);
  console.log(`ratio keyferry / raw addBulk: ${(k / b).toFixed(2)}`);
} finally {
  await api.close();
  await deleteKeyspace(redis, prefix);
  redis.disconnect();
}

// Something (a BullMQ or SDK handle) may keep the event loop alive after the clean-up: end the run explicitly.
process.exit(0);
