/**
 * Worker cost (run by hand: `npm run bench:worker-cost`; sizes by flag or environment: `--uploads N` / BENCH_N
 * (at most 10,000: one batch), `--concurrency C` / BENCH_CONCURRENCY, `--warmup N` / BENCH_WARMUP, `--metered` /
 * BENCH_METERED=1).
 *
 * N uploads as one batch through the API (in this process) and one worker process (worker/main.ts, as in
 * production, LOG_LEVEL=info) against the KMS emulator (in this process, no latency, no quotas). keyferry's KMS
 * quotas are off (KMS_QUOTAS=off), or with --metered metered as in production but never binding (a slot taken in
 * Redis before every KMS request, at 1,000,000 per second). Measures, from
 * the batch's submission to its completion (after a warm-up batch, not counted):
 * - the worker's CPU time (/proc/<pid>/stat utime + stime) per upload, and its peak RSS (/proc/<pid>/status
 *   VmHWM, over its whole life, warm-up included);
 * - Redis commands per upload from `INFO commandstats` (reset just before the batch) on a private redis-server,
 *   so no other user of a shared Redis is counted: every command Redis executed for API, worker and BullMQ,
 *   including those run inside Lua scripts (an EVALSHA counts once, and each redis.call in it once more);
 *   the benchmark's own INFO, CONFIG and its completion polls (one HMGET each) are left out;
 * - Redis's read system calls per upload (/proc/<pid>/io syscr), about one per client round trip (a pipeline
 *   or MULTI is read at once), Redis's CPU time and the bytes it received and sent per upload.
 * BENCH_CPU_PROF_DIR=dir makes the worker write a V8 CPU profile there.
 */
import { parseArgs } from 'node:util';
import { startApi } from '../api/server.js';
import { signToken } from '../shared/auth.js';
import { MAX_BATCH_ITEMS } from '../shared/batches.js';
import { loadConfig } from '../shared/config.js';
import { createLogger } from '../shared/logger.js';
import { Keyspace } from '../shared/stores/keyspace.js';
import { KmsEmulator } from '../test/kms-emulator/emulator.js';
import { EMULATOR_ACCESS_KEY, EMULATOR_SECRET_KEY, testEnv } from '../test/helpers/stack.js';
import { BENCH_JOB_ENV, commandCalls, fmt, intParam, machineLine, printTable, procCpuMs, procMemoryMiB, procReadSyscalls, QUOTAS_METERED_UNBOUND, QUOTAS_OFF, runBatch, scrapeValues, seed, startPrivateRedis, startWorkerProcess, type WorkerProcess } from './lib-bench.js';

const { values } = parseArgs({ options: { uploads: { type: 'string' }, concurrency: { type: 'string' }, warmup: { type: 'string' }, metered: { type: 'boolean' } } });
const METERED = values.metered === true || process.env.BENCH_METERED === '1';
const N = intParam(values.uploads, 'BENCH_N', 10_000);
const CONCURRENCY = intParam(values.concurrency, 'BENCH_CONCURRENCY', 8);
const WARMUP = intParam(values.warmup, 'BENCH_WARMUP', 100, 0);
if (N > MAX_BATCH_ITEMS) throw new Error(`at most ${MAX_BATCH_ITEMS} uploads (one batch)`);
const KEY_SPEC = 'RSA_2048';
const REGION = 'eu-west-1';
const POLL_MS = 500;
/** Commands of the benchmark itself, not of keyferry. */
const OWN_COMMANDS = new Set(['info', 'config|resetstat', 'config|set']);

const redis = await startPrivateRedis();
const emulator = new KmsEmulator({ accounts: { [EMULATOR_ACCESS_KEY]: '123456789012' } });
await emulator.start();
const env = testEnv('bench-cost', {
  REDIS_URL: redis.url,
  LOG_LEVEL: 'info',
  WORKER_CONCURRENCY: String(CONCURRENCY),
  KMS_QUOTAS: METERED ? QUOTAS_METERED_UNBOUND : QUOTAS_OFF,
  DEFAULT_WRAPPING_KEY_SPEC: KEY_SPEC,
  ...BENCH_JOB_ENV,
});
const config = loadConfig(env);
const keys = new Keyspace(config.KEYFERRY_PREFIX);
const api = await startApi(config, createLogger('silent'));
let worker: WorkerProcess | undefined;

const items = (n: number, tag: string) =>
  Array.from({ length: n }, (_, i) => ({ source_key_identifier: 'bench-key', region: REGION, kms: 'kms', aws_param: { Alias: `${tag}-${i}`, Tags: [{ TagKey: 'team', TagValue: 'bench' }] } }));

/** keyferry's commands since the last reset: the benchmark's own left out, its polls (an HMGET and an HGET each) taken off. */
const keyferryCalls = async (polls: number) => {
  const calls = await commandCalls(redis.client);
  for (const own of OWN_COMMANDS) calls.delete(own);
  for (const cmd of ['hmget', 'hget']) {
    calls.set(cmd, (calls.get(cmd) ?? 0) - polls);
    if (calls.get(cmd) === 0) calls.delete(cmd);
  }
  return calls;
};
const HEAP_USED = 'keyferry_nodejs_heap_size_used_bytes';
const HEAP_TOTAL = 'keyferry_nodejs_heap_size_total_bytes';
const EXTERNAL = 'keyferry_nodejs_external_memory_bytes';
/** The worker's V8 heap (used, total) and external memory, MiB, from its /metrics. */
const workerHeap = async (w: WorkerProcess) => {
  const v = await scrapeValues(w.metricsUrl, [HEAP_USED, HEAP_TOTAL, EXTERNAL]);
  return `${fmt(v[HEAP_USED] / 2 ** 20, 1)} / ${fmt(v[HEAP_TOTAL] / 2 ** 20, 1)} / ${fmt(v[EXTERNAL] / 2 ** 20, 1)}`;
};
const total = (calls: Map<string, number>) => [...calls.values()].reduce((s, n) => s + n, 0);

try {
  worker = await startWorkerProcess(env);
  const rssStarted = procMemoryMiB(worker.pid).now;
  const token = await signToken({ secret: config.JWT_SECRET, account: 'bench' });
  await seed(api.url, token, '/api/v1/cckm/aws/kms', {
    name: 'kms',
    account_id: '123456789012',
    regions: [REGION],
    aws_access_key_id: EMULATOR_ACCESS_KEY,
    aws_secret_access_key: EMULATOR_SECRET_KEY,
    endpoint: emulator.url,
  });
  await seed(api.url, token, '/api/v1/vault/keys2', { name: 'bench-key', algorithm: 'AES', size: 256 });
  if (WARMUP > 0) await runBatch(api.url, token, items(WARMUP, 'warm'));
  const rssWarm = procMemoryMiB(worker.pid).now;
  const heapWarm = await workerHeap(worker);

  const body = JSON.stringify({ items: items(N, 'cost') });
  await redis.client.config('RESETSTAT');
  const cpu0 = procCpuMs(worker.pid);
  const redisCpu0 = await redis.cpuMs();
  const reads0 = procReadSyscalls(redis.pid);
  const submittedAt = Date.now();
  const t0 = performance.now();
  const res = await fetch(`${api.url}/api/v1/cckm/aws/upload-key/batch`, { method: 'POST', headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' }, body });
  const text = await res.text();
  const intakeMs = performance.now() - t0;
  if (res.status !== 202) throw new Error(`batch answered ${res.status}: ${text.slice(0, 500)}`);
  const batchId = (JSON.parse(text) as { id: string }).id;
  const intakeCalls = await keyferryCalls(0);

  // Completion and progress, read straight from Redis (an HMGET and an HGET per poll, taken off the counts);
  // the worker's RSS at each quarter of the run.
  let polls = 0;
  let finishedAt = 0;
  let rssPeakSeen = 0;
  const rssByProgress: string[] = [];
  for (const deadline = Date.now() + 1_800_000; ; ) {
    await new Promise((r) => setTimeout(r, POLL_MS));
    polls++;
    const rss = procMemoryMiB(worker.pid).now;
    rssPeakSeen = Math.max(rssPeakSeen, rss);
    const done = Number(await redis.client.hget(keys.batchCounts(batchId), 'succeeded'));
    if (done >= ((rssByProgress.length + 1) * N) / 4) rssByProgress.push(`${done}: ${fmt(rss, 1)}`);
    const [status, finished] = await redis.client.hmget(keys.batch(batchId), 'status', 'finished_at');
    if (status === 'completed') {
      finishedAt = Date.parse(finished as string);
      break;
    }
    if (Date.now() > deadline) throw new Error(`batch ${batchId} did not complete`);
  }
  const cpuMs = procCpuMs(worker.pid) - cpu0;
  const redisCpuMs = (await redis.cpuMs()) - redisCpu0;
  const reads = procReadSyscalls(redis.pid) - reads0;
  const calls = await keyferryCalls(polls);
  // Reset with the command stats: bytes Redis received from and sent to its clients (the polls' few hundred bytes included).
  const stats = await redis.client.info('stats');
  const netKiB = (f: string) => Number(new RegExp(`^${f}:(\\d+)`, 'm').exec(stats)?.[1] ?? NaN) / 1024;
  const mem = procMemoryMiB(worker.pid);
  const heapEnd = await workerHeap(worker);
  const counts = await redis.client.hgetall(keys.batchCounts(batchId));
  if (Number(counts.succeeded) !== N) throw new Error(`not every upload succeeded: ${JSON.stringify(counts)}`);
  const wall = (finishedAt - submittedAt) / 1000;
  const all = total(calls);
  const scripts = (calls.get('evalsha') ?? 0) + (calls.get('eval') ?? 0);

  console.log(machineLine());
  console.log(`redis ${redis.version} (private, appendfsync everysec); API and emulator (no latency, no quotas) in this process; one worker process (tsx, LOG_LEVEL=info), concurrency ${CONCURRENCY}; wrapping key ${KEY_SPEC}; warm-up ${WARMUP}`);
  console.log(`worker cost: ${N} uploads in one batch, KMS quotas ${METERED ? 'metered (never binding)' : 'off'}, ${fmt(N / wall, 1)} uploads/s, intake (POST until its 202) ${fmt(intakeMs, 0)} ms`);
  printTable(
    ['uploads', 'wall s', 'worker CPU ms/upload', 'Redis commands/upload (incl. inside Lua)', 'of which intake (API)', 'Lua script calls/upload', 'Redis read syscalls/upload (≈ round trips)', 'Redis CPU ms/upload', 'Redis network in / out KiB/upload', 'worker peak RSS MB (VmHWM)', 'worker RSS MB: started, after warm-up, end'],
    [[N, fmt(wall, 1), fmt(cpuMs / N, 2), fmt(all / N, 1), fmt(total(intakeCalls) / N, 1), fmt(scripts / N, 1), fmt(reads / N, 1), fmt(redisCpuMs / N, 2), `${fmt(netKiB('total_net_input_bytes') / N, 1)} / ${fmt(netKiB('total_net_output_bytes') / N, 1)}`, fmt(mem.peak, 1), `${fmt(rssStarted, 1)}, ${fmt(rssWarm, 1)}, ${fmt(mem.now, 1)}`]],
  );
  console.log('');
  console.log('top 10 Redis commands (INFO commandstats; commands inside Lua scripts count under their own names):');
  printTable(
    ['command', 'calls/upload', 'share'],
    [...calls]
      .sort((a, b) => b[1] - a[1])
      .slice(0, 10)
      .map(([cmd, n]) => [cmd, fmt(n / N, 2), `${fmt((100 * n) / all, 1)}%`]),
  );
  console.log(`worker RSS MB by uploads done: ${rssByProgress.join(', ')}; V8 heap used / heap total / external MiB: after warm-up ${heapWarm}, at the end ${heapEnd}`);
  console.log(`Redis commands per upload: ${fmt(all / N, 1)}; worker CPU ms per upload: ${fmt(cpuMs / N, 2)}; worker peak RSS MB: ${fmt(mem.peak, 1)} (highest RSS seen while polling: ${fmt(rssPeakSeen, 1)})`);
} finally {
  await worker?.stop();
  await api.close();
  await emulator.close();
  await redis.stop();
}
// Something (a BullMQ or SDK handle) may keep the event loop alive after the clean-up: end the run explicitly.
process.exit(0);
