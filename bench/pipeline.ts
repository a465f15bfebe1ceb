/**
 * Pipeline overhead (run by hand: `npm run bench:pipeline`; sizes by flag or environment:
 * `--uploads N` / BENCH_N, `--rounds R` / BENCH_ROUNDS, `--workers W` / BENCH_WORKERS,
 * `--concurrency C` / BENCH_CONCURRENCY, `--latency MS` / BENCH_LATENCY_MS, `--warmup N` / BENCH_WARMUP,
 * `--prefetch P` / BENCH_PREFETCH: the workers' WORKER_PREFETCH, jobs held ahead of the C in flight; default
 * the configuration's).
 *
 * N uploads through keyferry (one batch through the API; W worker processes of concurrency C) next to the same
 * KMS requests sent directly with @aws-sdk/client-kms, W × C uploads in flight (bench/lib-bench.ts bareUpload:
 * CreateKey EXTERNAL, CreateAlias and GetParametersForImport at once, wrap, ImportKeyMaterial, DescribeKey,
 * GetKeyPolicy, ListAliases, ListResourceTags, GetKeyRotationStatus at once — what worker/pipeline.ts sends on
 * the happy path, in the same order).
 * The KMS emulator runs in a process of its own and adds a fixed latency to every request; quotas are off in
 * the emulator and, through KMS_QUOTAS=off, in keyferry (which then takes no slot in Redis per request). The two
 * alternate for R rounds (each round in fresh emulator regions, so both see as many keys); the figures are the
 * medians, and also the ratio over all rounds (all uploads over their total time), which moves less between
 * runs. keyferry's uploads count as done when its batch is completed: the batch's finished_at, written in the
 * same script as the last job's `succeeded`, ends the measurement (a poll every 250 ms only notices it). Also
 * prints, per run, the KMS requests per upload the emulator received (the same on both sides), the CPU each
 * process used, the sender's (this process for bare, the workers for keyferry) share of a core, the share of the
 * time its main thread waited, runnable, for a CPU (/proc/<pid>/schedstat), its event-loop delay, the round trip
 * of a Redis PING meanwhile, and where keyferry's time goes (its step and KMS-request histograms, scraped from
 * the workers' /metrics). BENCH_CPU_PROF_DIR=dir makes the workers write V8 CPU
 * profiles there. Redis: a private redis-server (appendfsync everysec), stopped at the end.
 */
import { randomBytes } from 'node:crypto';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import os from 'node:os';
import { parseArgs } from 'node:util';
import type { KMSClient } from '@aws-sdk/client-kms';
import { startApi } from '../api/server.js';
import { signToken } from '../shared/auth.js';
import { DEFAULT_WORKER_PREFETCH, loadConfig } from '../shared/config.js';
import { createLogger } from '../shared/logger.js';
import { EMULATOR_ACCESS_KEY, EMULATOR_SECRET_KEY } from '../test/helpers/stack.js';
import { bareKmsClient, bareUpload, BENCH_TAGS, fmt, histogramDelta, intParam, machineLine, mainThreadRunQueueMs, median, percentile, printTable, pinToCpu, pipelineEnv, procCpuMs, runBatch, runPool, scrapeHistogram, scrapeValues, seed, selfCpuMs, startPrivateRedis, startWorkerProcess, type WorkerProcess } from './lib-bench.js';
import { startEmulatorProcess } from './lib-emulator.js';

const { values } = parseArgs({
  options: {
    uploads: { type: 'string' },
    rounds: { type: 'string' },
    workers: { type: 'string' },
    concurrency: { type: 'string' },
    latency: { type: 'string' },
    warmup: { type: 'string' },
    prefetch: { type: 'string' },
    pin: { type: 'boolean' },
  },
});
const N = intParam(values.uploads, 'BENCH_N', 1500);
const ROUNDS = intParam(values.rounds, 'BENCH_ROUNDS', 5);
const WORKERS = intParam(values.workers, 'BENCH_WORKERS', 1);
const CONCURRENCY = intParam(values.concurrency, 'BENCH_CONCURRENCY', 8);
const LATENCY_MS = intParam(values.latency, 'BENCH_LATENCY_MS', 5, 0);
const WARMUP = intParam(values.warmup, 'BENCH_WARMUP', 100, 0);
const PREFETCH = intParam(values.prefetch, 'BENCH_PREFETCH', DEFAULT_WORKER_PREFETCH, 0);
const IN_FLIGHT = WORKERS * CONCURRENCY;
/**
 * `--pin`: the sender of each phase (this process for bare, the worker for keyferry; one worker only) gets CPU 0
 * to itself, everything else (emulator, Redis, this process during keyferry's phases) shares CPU 1: each sender
 * then runs on a core of its own, as when the other processes are on other machines.
 */
const PIN = values.pin === true;
if (PIN && (WORKERS !== 1 || os.cpus().length < 2)) throw new Error('--pin needs one worker and two CPUs');
const GOAL = 0.8;
const KEY_SPEC = 'RSA_2048';
const ACCOUNT_ID = '123456789012';
const KMS_TIMEOUT_MS = 15_000;
// Each phase of each round uploads into a region of its own, so that every phase finds the emulator's key
// store (whose alias listing grows with it) as full as the others.
const REGION_POOL = ['eu-west-1', 'us-east-1', 'ap-south-1', 'eu-central-1', 'us-west-2', 'ap-northeast-1', 'eu-west-2', 'us-east-2', 'ca-central-1', 'sa-east-1', 'eu-north-1', 'ap-southeast-2'];
if (2 * ROUNDS + 1 > REGION_POOL.length) throw new Error(`at most ${(REGION_POOL.length - 1) / 2} rounds`);
const WARM_REGION = REGION_POOL[0] as string;
const regionOf = (round: number, side: 'bare' | 'keyferry') => REGION_POOL[1 + 2 * round + (side === 'bare' ? 0 : 1)] as string;

const redis = await startPrivateRedis();
const emulator = await startEmulatorProcess({ accounts: { [EMULATOR_ACCESS_KEY]: ACCOUNT_ID }, latencyMs: LATENCY_MS });
const env = pipelineEnv('bench-pipeline', { redisUrl: redis.url, concurrency: CONCURRENCY, prefetch: PREFETCH, kmsTimeoutMs: KMS_TIMEOUT_MS, keySpec: KEY_SPEC });
const config = loadConfig(env);
const api = await startApi(config, createLogger('silent'));
const workers: WorkerProcess[] = [];
const clients = new Map<string, KMSClient>();

const bareClient = (region: string) => {
  let c = clients.get(region);
  if (!c) {
    c = bareKmsClient({ region, endpoint: emulator.url, accessKeyId: EMULATOR_ACCESS_KEY, secretAccessKey: EMULATOR_SECRET_KEY, timeoutMs: KMS_TIMEOUT_MS });
    clients.set(region, c);
  }
  return c;
};

interface Cpu {
  bench: number;
  emulator: number;
  workers: number;
  redis: number;
  /** Run-queue wait of this process's main thread and of the workers' (summed), ms. */
  benchWaiting: number;
  workersWaiting: number;
}
const cpuNow = async (): Promise<Cpu> => ({
  bench: selfCpuMs(),
  emulator: procCpuMs(emulator.pid),
  workers: workers.reduce((sum, w) => sum + procCpuMs(w.pid), 0),
  redis: await redis.cpuMs(),
  benchWaiting: mainThreadRunQueueMs(process.pid),
  workersWaiting: workers.reduce((sum, w) => sum + mainThreadRunQueueMs(w.pid), 0),
});
const cpuDelta = (a: Cpu, b: Cpu): Cpu => ({
  bench: a.bench - b.bench,
  emulator: a.emulator - b.emulator,
  workers: a.workers - b.workers,
  redis: a.redis - b.redis,
  benchWaiting: a.benchWaiting - b.benchWaiting,
  workersWaiting: a.workersWaiting - b.workersWaiting,
});

interface Phase {
  round: number;
  side: 'bare' | 'keyferry';
  seconds: number;
  cpu: Cpu;
  /** Requests the emulator received during the phase (the same KMS requests per upload on both sides). */
  kmsRequests: number;
  /** Event-loop delay (ms) of the process(es) sending the KMS requests: this one for bare, the workers for keyferry. */
  loopDelay: { mean: number; p99: number };
  /** keyferry: round trip of a PING to Redis from this (then idle) process, ms: what one Redis command costs then. */
  ping?: { mean: number; p99: number };
}

/** PINGs Redis every 25 ms until stopped; mean and p99 round trip, ms. */
function pingSampler() {
  const rtts: number[] = [];
  let stopped = false;
  const loop = (async () => {
    while (!stopped) {
      const t0 = performance.now();
      await redis.client.ping();
      rtts.push(performance.now() - t0);
      await new Promise((r) => setTimeout(r, 25));
    }
  })();
  return async () => {
    stopped = true;
    await loop;
    const sorted = [...rtts].sort((a, b) => a - b);
    return { mean: rtts.reduce((a, b) => a + b, 0) / rtts.length, p99: percentile(sorted, 0.99) };
  };
}

/** Event-loop delay is sampled every 10 ms (prom-client's default in the workers, the same here): what exceeds it. */
const LOOP_RESOLUTION_MS = 10;
const MEAN = 'keyferry_nodejs_eventloop_lag_mean_seconds';
const P99 = 'keyferry_nodejs_eventloop_lag_p99_seconds';
/** The workers' event-loop delay since the previous scrape (prom-client resets its histogram at each), ms; worst worker. */
const workersLoopDelay = async () => {
  const each = await Promise.all(workers.map((w) => scrapeValues(w.metricsUrl, [MEAN, P99])));
  return { mean: Math.max(...each.map((e) => e[MEAN] * 1000 - LOOP_RESOLUTION_MS)), p99: Math.max(...each.map((e) => e[P99] * 1000 - LOOP_RESOLUTION_MS)) };
};

const material = randomBytes(32);
/** --pin: the phase's sender on CPU 0, the rest on CPU 1. */
function pinFor(side: Phase['side']): void {
  if (!PIN) return;
  pinToCpu(process.pid, side === 'bare' ? 0 : 1);
  for (const w of workers) pinToCpu(w.pid, side === 'bare' ? 1 : 0);
  pinToCpu(emulator.pid, 1);
  pinToCpu(redis.pid, 1);
}

async function runBare(round: number, region: string, n: number): Promise<Phase> {
  const client = bareClient(region);
  pinFor('bare');
  // The same sampling as prom-client's event-loop lag metrics in the workers.
  const delay = monitorEventLoopDelay({ resolution: LOOP_RESOLUTION_MS });
  const cpu0 = await cpuNow();
  const calls0 = (await emulator.stats([])).totalCalls;
  delay.enable();
  const t0 = performance.now();
  await runPool(n, IN_FLIGHT, (i) => bareUpload(client, { alias: `bare-${round}-${i}`, jobTag: `${randomBytes(16).toString('hex')}.${i}`, material, keySpec: KEY_SPEC, tags: BENCH_TAGS }));
  const seconds = (performance.now() - t0) / 1000;
  delay.disable();
  const kmsRequests = (await emulator.stats([])).totalCalls - calls0;
  return { round, side: 'bare', seconds, cpu: cpuDelta(await cpuNow(), cpu0), kmsRequests, loopDelay: { mean: delay.mean / 1e6 - LOOP_RESOLUTION_MS, p99: delay.percentile(99) / 1e6 - LOOP_RESOLUTION_MS } };
}

let token = '';
async function runKeyferry(round: number, region: string, n: number): Promise<Phase> {
  pinFor('keyferry');
  const items = Array.from({ length: n }, (_, i) => ({ source_key_identifier: 'bench-key', region, kms: 'kms', aws_param: { Alias: `kf-${round}-${i}`, Tags: BENCH_TAGS } }));
  await workersLoopDelay(); // resets the workers' event-loop delay histograms
  const calls0 = (await emulator.stats([])).totalCalls;
  const cpu0 = await cpuNow();
  const stopPing = pingSampler();
  const run = await runBatch(api.url, token, items);
  const ping = await stopPing();
  const cpu = cpuDelta(await cpuNow(), cpu0);
  const loopDelay = await workersLoopDelay();
  const kmsRequests = (await emulator.stats([])).totalCalls - calls0;
  if (run.counts.succeeded !== n) throw new Error(`keyferry round ${round}: ${JSON.stringify(run.counts)}`);
  return { round, side: 'keyferry', seconds: (run.finishedAt - run.submittedAt) / 1000, cpu, kmsRequests, loopDelay, ping };
}

const scrapeAll = async (name: string, label: string) => {
  const maps = await Promise.all(workers.map((w) => scrapeHistogram(w.metricsUrl, name, label)));
  const out = new Map<string, { sum: number; count: number }>();
  for (const m of maps) for (const [k, v] of m) out.set(k, { sum: (out.get(k)?.sum ?? 0) + v.sum, count: (out.get(k)?.count ?? 0) + v.count });
  return out;
};

try {
  for (let w = 0; w < WORKERS; w++) workers.push(await startWorkerProcess(env));
  token = await signToken({ secret: config.JWT_SECRET, account: 'bench' });
  await seed(api.url, token, '/api/v1/cckm/aws/kms', {
    name: 'kms',
    account_id: ACCOUNT_ID,
    regions: REGION_POOL,
    aws_access_key_id: EMULATOR_ACCESS_KEY,
    aws_secret_access_key: EMULATOR_SECRET_KEY,
    endpoint: emulator.url,
  });
  await seed(api.url, token, '/api/v1/vault/keys2', { name: 'bench-key', algorithm: 'AES', size: 256 });

  // Warm-up, not measured: JIT, connection pools, the emulator's RSA wrapping keys.
  if (WARMUP > 0) {
    await runBare(-1, WARM_REGION, WARMUP);
    await runKeyferry(-1, WARM_REGION, WARMUP);
  }

  const phases: Phase[] = [];
  const steps0 = await scrapeAll('keyferry_step_duration_seconds', 'step');
  const kms0 = await scrapeAll('keyferry_kms_request_duration_seconds', 'operation');
  for (let r = 0; r < ROUNDS; r++) {
    // Alternate which side goes first, so that a drift in the machine's load favours neither.
    const order = r % 2 === 0 ? (['bare', 'keyferry'] as const) : (['keyferry', 'bare'] as const);
    for (const side of order) phases.push(side === 'bare' ? await runBare(r, regionOf(r, side), N) : await runKeyferry(r, regionOf(r, side), N));
  }
  const steps = histogramDelta(await scrapeAll('keyferry_step_duration_seconds', 'step'), steps0);
  const kms = histogramDelta(await scrapeAll('keyferry_kms_request_duration_seconds', 'operation'), kms0);

  const rate = (p: Phase) => N / p.seconds;
  const of = (side: Phase['side']) => phases.filter((p) => p.side === side);
  const bareRate = median(of('bare').map(rate));
  const kfRate = median(of('keyferry').map(rate));
  const ratio = kfRate / bareRate;

  console.log(machineLine());
  console.log(`redis ${redis.version} (private, appendfsync everysec); emulator in its own process, ${LATENCY_MS} ms added to every request, no quotas`);
  console.log(`pipeline overhead: ${N} uploads per run, ${ROUNDS} rounds, ${WORKERS} worker process(es) × concurrency ${CONCURRENCY} = ${IN_FLIGHT} uploads in flight on both sides (keyferry's workers hold ${PREFETCH} job(s) each ahead of those, WORKER_PREFETCH), wrapping key ${KEY_SPEC}, warm-up ${WARMUP}${PIN ? '; pinned: the sender on CPU 0, everything else on CPU 1' : ''}`);
  // The process sending the KMS requests: this one (bare) or the workers (keyferry); its CPU share of one core
  // (per worker) and event-loop delay tell whether it is the bottleneck.
  const sender = (p: Phase) => (p.side === 'bare' ? p.cpu.bench : p.cpu.workers);
  // The sender's main thread runnable but not running (another process had the cores), % of the phase's wall
  // time (per worker): with the busy % above, how much of the time it wanted a CPU.
  const senderWaiting = (p: Phase) => (p.side === 'bare' ? p.cpu.benchWaiting : p.cpu.workersWaiting) / (p.seconds * 1000 * (p.side === 'bare' ? 1 : WORKERS));
  printTable(
    ['round', 'what', 'wall s', 'uploads/s', 'KMS requests/upload', 'sender CPU ms/upload', 'sender busy % of a core', 'sender main thread waiting for a CPU, % of wall', 'sender event-loop delay mean / p99 ms', 'Redis PING from the bench process mean / p99 ms', 'CPU ms/upload: bench process (API, poll)', 'emulator', 'redis'],
    phases.map((p) => [
      p.round + 1,
      p.side === 'bare' ? 'bare SDK sequence (sender: this process)' : `keyferry (sender: ${WORKERS} worker process(es))`,
      fmt(p.seconds, 2),
      fmt(rate(p), 1),
      fmt(p.kmsRequests / N, 2),
      fmt(sender(p) / N, 2),
      fmt((100 * sender(p)) / (p.seconds * 1000 * (p.side === 'bare' ? 1 : WORKERS)), 0),
      fmt(100 * senderWaiting(p), 0),
      `${fmt(p.loopDelay.mean, 1)} / ${fmt(p.loopDelay.p99, 1)}`,
      p.ping ? `${fmt(p.ping.mean, 2)} / ${fmt(p.ping.p99, 2)}` : '—',
      p.side === 'bare' ? '—' : fmt(p.cpu.bench / N, 2),
      fmt(p.cpu.emulator / N, 2),
      fmt(p.cpu.redis / N, 2),
    ]),
  );
  console.log('');
  printTable(
    ['what', 'uploads/s (median)', 'all rounds'],
    [
      ['bare @aws-sdk/client-kms sequence', fmt(bareRate, 1), of('bare').map((p) => fmt(rate(p), 1)).join(', ')],
      ['keyferry: batch through API + worker(s), until the batch completed', fmt(kfRate, 1), of('keyferry').map((p) => fmt(rate(p), 1)).join(', ')],
    ],
  );
  const kfSeconds = of('keyferry').reduce((s, p) => s + p.seconds, 0);
  const bareSeconds = of('bare').reduce((s, p) => s + p.seconds, 0);
  console.log(`ratio keyferry / bare sequence (uploads/s): ${ratio.toFixed(2)} (rounds: ${of('keyferry').map((p, i) => (rate(p) / rate(of('bare')[i] as Phase)).toFixed(2)).join(', ')})`);
  // The median swings with single rounds; all uploads over all time is the steadier figure between runs.
  console.log(`ratio over all rounds (uploads of all rounds / their total time): ${(bareSeconds / kfSeconds).toFixed(3)}`);
  console.log(`goal keyferry ≥ ${GOAL * 100}% of the bare sequence: ${ratio >= GOAL ? 'met' : 'NOT met'}`);

  // Where keyferry's time goes: each in-flight slot spends IN_FLIGHT × wall / N per upload.
  const uploads = N * ROUNDS;
  const perUpload = (sumSeconds: number) => (sumSeconds * 1000) / uploads;
  const stepRows = [...steps].filter(([, v]) => v.count > 0).map(([step, v]) => [step, fmt(perUpload(v.sum), 2)]);
  const stepsMs = [...steps.values()].reduce((s, v) => s + perUpload(v.sum), 0);
  const kmsMs = [...kms.values()].reduce((s, v) => s + perUpload(v.sum), 0);
  const slotMs = (IN_FLIGHT * kfSeconds * 1000) / uploads;
  console.log('');
  console.log(`where a keyferry upload's time goes (per upload, ms; an in-flight slot spends ${fmt(slotMs, 2)} ms per upload, the bare sequence ${fmt((IN_FLIGHT * bareSeconds * 1000) / uploads, 2)} ms):`);
  printTable(['pipeline step (keyferry_step_duration_seconds)', 'ms per upload'], [...stepRows, ['all steps', fmt(stepsMs, 2)], ['outside the steps (BullMQ fetch/complete, job start and finish records)', fmt(slotMs - stepsMs, 2)]]);
  printTable(
    ['KMS request (keyferry_kms_request_duration_seconds)', 'ms per upload', 'requests per upload'],
    [...[...kms].filter(([, v]) => v.count > 0).map(([op, v]) => [op, fmt(perUpload(v.sum), 2), fmt(v.count / uploads, 2)]), ['all (the five describe requests overlap)', fmt(kmsMs, 2), '']],
  );
} finally {
  for (const c of clients.values()) c.destroy();
  await Promise.all(workers.map((w) => w.stop()));
  await api.close();
  await emulator.close();
  await redis.stop();
}
// Something (a BullMQ or SDK handle) may keep the event loop alive after the clean-up: end the run explicitly.
process.exit(0);
