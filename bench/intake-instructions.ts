/**
 * Intake cost in instructions (run by hand: `npm run bench:intake-instructions`, optional `-- --requests N
 * --warmup W`; needs valgrind, from Debian's packages). The throughput benchmark (`bench:intake`) moves by tens
 * of percent between runs on a shared machine; an instruction count moves less. Each server runs as a process of
 * its own under `valgrind --tool=callgrind`: the bare Express 5 JSON endpoint (bench/lib-bare-express.ts) and
 * keyferry's API (api/main.ts, logging silent as in `bench:intake`, against the Redis at REDIS_URL under a
 * throw-away prefix, deleted at the end). Node runs with `--single-threaded` (no helper threads: the JIT compiler
 * and the garbage collector work on the counted thread, and callgrind counts them too). Each server first gets W
 * POSTs, not counted (JIT, caches; counting starts with `callgrind_control -i on`), then N more, counted, all of
 * the same body and one after the other (what the JIT compiles, and so the count, depends on the order requests
 * come in); the figure is the instructions of the server process (user space; the kernel's part of the socket
 * calls is not counted) divided by N. Seen on this project's build machine: the bare endpoint's count was the
 * same to 0.1 % between runs from one checkout, idle or loaded, and 2 % apart between checkouts of the same
 * code; keyferry's moved by up to a third between runs of 500 counted requests (a major GC or a recompilation
 * falls inside the window or not), hence N = 3000 by default.
 * The ratio bare / keyferry is the throughput ratio keyferry would reach if both were bound by their own
 * CPU and the load generator cost nothing.
 */
import { parseArgs } from 'node:util';
import { signToken } from '../shared/auth.js';
import { createRedis } from '../shared/redis.js';
import { deleteKeyspace } from '../shared/stores/keyspace.js';
import { testEnv } from '../test/helpers/stack.js';
import { freePort } from '../test/helpers/redis-server.js';
import { BENCH_JOB_ENV, fmt, intParam, machineLine, printTable, seed } from './lib-bench.js';
import { lineMatching, requireValgrind, startCounted } from './lib-callgrind.js';

const { values } = parseArgs({ options: { requests: { type: 'string' }, warmup: { type: 'string' } } });
const N = intParam(values.requests, 'BENCH_N', 3000);
const WARMUP = intParam(values.warmup, 'BENCH_WARMUP', 6000, 0);

requireValgrind('bench:intake-instructions');

const body = JSON.stringify({ source_key_identifier: 'test-key', region: 'ap-south-1', kms: 'kms', aws_param: { Alias: 'bench-intake', Tags: [{ TagKey: 'team', TagValue: 'bench' }] } });

interface Counted {
  instructions: number;
  requests: number;
}

/**
 * Starts the server under callgrind (bench/lib-callgrind.ts), waits for `ready` (it returns the URL to POST to
 * and the headers), sends the warm-up, counts N sequential requests, stops the server with SIGTERM.
 */
async function measure(entry: string[], env: Record<string, string>, ready: (lines: string[]) => Promise<{ url: string; headers: Record<string, string> }>): Promise<Counted> {
  const server = startCounted(entry, env);
  try {
    const target = await Promise.race([ready(server.lines), server.exited]);
    const post = async () => {
      const res = await fetch(target.url, { method: 'POST', headers: target.headers, body });
      await res.arrayBuffer();
      if (res.status !== 202) throw new Error(`${target.url} answered ${res.status}`);
    };
    for (let i = 0; i < WARMUP; i++) await post();
    server.count(true);
    for (let i = 0; i < N; i++) await post();
    server.count(false);
    return { instructions: await server.stop(), requests: N };
  } finally {
    await server.kill();
  }
}

const bare = await measure(['bench/lib-bare-express.ts'], {}, async (lines) => {
  const m = await lineMatching(lines, /"msg":"bare listening","url":"([^"]+)"/);
  return { url: m[1] as string, headers: { 'content-type': 'application/json' } };
});

const env = testEnv('bench-instructions', {
  REDIS_URL: process.env.REDIS_URL ?? 'redis://127.0.0.1:6379',
  LOG_LEVEL: 'silent',
  PORT: String(await freePort()),
  ...BENCH_JOB_ENV,
});
let keyferry: Counted;
try {
  keyferry = await measure(['api/main.ts'], env, async () => {
    const base = `http://127.0.0.1:${env.PORT}`;
    for (const deadline = Date.now() + 120_000; ; ) {
      const up = await fetch(`${base}/healthz`).then((r) => r.ok, () => false);
      if (up) break;
      if (Date.now() > deadline) throw new Error('keyferry did not answer /healthz within 120 s');
      await new Promise((r) => setTimeout(r, 250));
    }
    const token = await signToken({ secret: env.JWT_SECRET as string, account: 'bench' });
    const headers = { authorization: `Bearer ${token}`, 'content-type': 'application/json' };
    await seed(base, token, '/api/v1/cckm/aws/kms', { name: 'kms', account_id: '123456789012', regions: ['ap-south-1'], endpoint: 'http://127.0.0.1:1' });
    await seed(base, token, '/api/v1/vault/keys2', { name: 'test-key' });
    return { url: `${base}/api/v1/cckm/aws/upload-key`, headers };
  });
} finally {
  const redis = createRedis({ REDIS_URL: env.REDIS_URL as string, REDIS_CLUSTER_NODES: undefined });
  await deleteKeyspace(redis, env.KEYFERRY_PREFIX as string);
  redis.disconnect();
}

const perRequest = (c: Counted) => c.instructions / c.requests / 1000;
console.log(machineLine());
console.log(`intake instructions: ${N} sequential POSTs counted after ${WARMUP} not counted; valgrind callgrind, node --single-threaded`);
printTable(
  ['server', 'thousand instructions per request'],
  [
    ['bare Express 5 JSON endpoint (express.json, 202)', fmt(perRequest(bare), 1)],
    ['keyferry POST …/upload-key (logging silent)', fmt(perRequest(keyferry), 1)],
  ],
);
console.log(`ratio bare / keyferry instructions per request: ${(perRequest(bare) / perRequest(keyferry)).toFixed(3)}`);
process.exit(0);
