/**
 * API CPU per upload (run by hand: `npm run bench:api-cpu`, optional `-- --requests N --connections C --rounds R`).
 * The real API (`api/main.ts`, LOG_LEVEL=info, access lines to a pipe as in production) and the bare Express 5 JSON
 * endpoint (bench/lib-bare-express.ts) each run in a process of their own; autocannon runs here, so the servers'
 * CPU, read from /proc after each run of N POSTs, is theirs alone. Throughput on this shared machine swings by tens
 * of percent from one minute to the next; CPU time per request moves much less, which makes this the figure to
 * compare code changes with. The two alternate for R rounds (which goes first alternates too); medians printed.
 * Uses the Redis at REDIS_URL under a throw-away prefix, deleted at the end. BENCH_CPU_PROF_DIR=dir makes the API
 * write a V8 CPU profile (.cpuprofile) there when it exits.
 */
import { parseArgs } from 'node:util';
import autocannon, { type Result } from 'autocannon';
import { Redis } from 'ioredis';
import { signToken } from '../shared/auth.js';
import { deleteKeyspace } from '../shared/stores/keyspace.js';
import { runEntry, type Child } from '../test/helpers/child.js';
import { testEnv } from '../test/helpers/stack.js';
import { intParam, machineLine, median, printTable, procCpuMs, seed } from './lib-bench.js';

const { values } = parseArgs({ options: { requests: { type: 'string' }, connections: { type: 'string' }, rounds: { type: 'string' } } });
const N = intParam(values.requests, 'BENCH_REQUESTS', 12_000);
const CONNECTIONS = intParam(values.connections, 'BENCH_CONNECTIONS', 20);
const ROUNDS = intParam(values.rounds, 'BENCH_ROUNDS', 4);

const env = testEnv('bench-api-cpu', {
  REDIS_URL: process.env.REDIS_URL ?? 'redis://127.0.0.1:6379',
  LOG_LEVEL: 'info',
  INTAKE_RATE_PER_SECOND: '1000000',
  INTAKE_BURST: '1000000',
});
const redis = new Redis(env.REDIS_URL as string);
const children: Child[] = [];

/** Starts an entry in its own process and returns its pid and the URL its `msg` log line names. */
async function start(entry: string, msg: string, childEnv: Record<string, string>, profDir?: string, args: string[] = []): Promise<{ pid: number; url: string }> {
  // runEntry runs `node --import tsx <entry> <args>`: node's own flags (not allowed in NODE_OPTIONS) go first.
  const child = profDir ? runEntry('--cpu-prof', childEnv, [`--cpu-prof-dir=${profDir}`, entry, ...args]) : runEntry(entry, childEnv, args);
  children.push(child);
  const line = await child.waitForLog(msg, 30_000);
  return { pid: child.proc.pid as number, url: String(line.url) };
}

try {
  const api = await start('api/main.ts', 'api listening', env, process.env.BENCH_CPU_PROF_DIR);
  const bare = await start('bench/lib-bare-express.ts', 'bare listening', {});
  const bareRedis = await start('bench/lib-bare-express.ts', 'bare listening', {}, undefined, ['--redis', env.REDIS_URL as string, '--prefix', `${env.KEYFERRY_PREFIX}:bare`]);
  const token = await signToken({ secret: env.JWT_SECRET as string, account: 'bench' });
  await seed(api.url, token, '/api/v1/cckm/aws/kms', { name: 'kms', account_id: '123456789012', regions: ['ap-south-1'], endpoint: 'http://127.0.0.1:1' });
  await seed(api.url, token, '/api/v1/vault/keys2', { name: 'test-key' });
  const body = JSON.stringify({ source_key_identifier: 'test-key', region: 'ap-south-1', kms: 'kms', aws_param: { Alias: 'bench-api-cpu', Tags: [{ TagKey: 'team', TagValue: 'bench' }] } });
  const headers = { authorization: `Bearer ${token}`, 'content-type': 'application/json' };
  const sides = {
    bare: { pid: bare.pid, url: bare.url },
    bareRedis: { pid: bareRedis.pid, url: bareRedis.url },
    keyferry: { pid: api.pid, url: `${api.url}/api/v1/cckm/aws/upload-key` },
  };

  /** N POSTs to one side; its process's CPU µs per request (user + system) and the requests per second. */
  const measure = async (side: keyof typeof sides, amount: number) => {
    const { pid, url } = sides[side];
    const cpu0 = procCpuMs(pid);
    const r: Result = await autocannon({ url, method: 'POST', headers, body, connections: CONNECTIONS, amount });
    const cpuMs = procCpuMs(pid) - cpu0;
    if (r.non2xx > 0 || r.errors > 0 || r.timeouts > 0) throw new Error(`${side}: ${r.non2xx} non-2xx, ${r.errors} errors, ${r.timeouts} timeouts`);
    return { cpuUs: (cpuMs * 1000) / r.requests.total, rps: r.requests.total / r.duration };
  };
  const names = Object.keys(sides) as (keyof typeof sides)[];
  for (const side of names) await measure(side, Math.min(N, 2000)); // warm-up: JIT, connection pools

  const runs: { round: number; side: keyof typeof sides; cpuUs: number; rps: number }[] = [];
  for (let round = 1; round <= ROUNDS; round++) {
    const order = round % 2 ? names : [...names].reverse();
    for (const side of order) runs.push({ round, side, ...(await measure(side, N)) });
  }
  const of = (side: keyof typeof sides) => runs.filter((r) => r.side === side);
  const cpu = Object.fromEntries(names.map((side) => [side, median(of(side).map((r) => r.cpuUs))])) as Record<keyof typeof sides, number>;
  const label = {
    bare: 'bare Express 5 JSON endpoint',
    bareRedis: 'bare endpoint + the Redis calls an upload needs (token script, read, record write, BullMQ add)',
    keyferry: 'keyferry API',
  };

  console.log(machineLine());
  console.log(`API CPU per request: ${N} POSTs per run, ${CONNECTIONS} connections, ${ROUNDS} rounds; keyferry: POST …/upload-key, LOG_LEVEL=info, no worker`);
  if (process.env.BENCH_CPU_PROF_DIR) console.log('(the API ran under the CPU profiler: its figures include the profiler, so the ratios below understate it)');
  printTable(
    ['what', 'CPU µs/request (median)', 'all rounds', 'requests/s, all rounds'],
    names.map((side) => [
      label[side],
      cpu[side].toFixed(0),
      of(side).map((r) => r.cpuUs.toFixed(0)).join(', '),
      of(side).map((r) => r.rps.toFixed(0)).join(', '),
    ]),
  );
  console.log(`ratio bare / keyferry CPU per request: ${(cpu.bare / cpu.keyferry).toFixed(2)}`);
  // The best ratio keyferry could reach while still making the Redis calls an accepted upload needs.
  console.log(`ratio bare / (bare + Redis calls) CPU per request: ${(cpu.bare / cpu.bareRedis).toFixed(2)}`);
} finally {
  for (const child of children) child.proc.kill('SIGTERM');
  await Promise.all(children.map((c) => c.exited));
  await deleteKeyspace(redis, env.KEYFERRY_PREFIX as string);
  redis.disconnect();
}
process.exit(0); // autocannon keeps the event loop alive after its runs
