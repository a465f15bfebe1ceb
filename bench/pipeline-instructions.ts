/**
 * Pipeline cost in instructions (run by hand: `npm run bench:pipeline-instructions`, optional `-- --uploads N
 * --warmup W --concurrency C`; needs valgrind, from Debian's packages). `bench:pipeline` compares uploads/s, and
 * both of its senders are bound by their CPU there; but a shared machine's speed moves by tens of percent from
 * one ten-second phase to the next, so its ratio does too. An instruction count moves less: the bare side's by
 * about 3 % between runs, the worker's by up to 15 % (how many replies share an event-loop turn depends on how
 * fast the native emulator and Redis answer, so on the machine's load): compare several runs. The sender of
 * each side runs as a process of its own under callgrind (bench/lib-callgrind.ts): the bare sequence of the
 * same KMS requests (bench/lib-bare-pipeline-child.ts) and one keyferry worker (worker/main.ts, LOG_LEVEL=info as
 * in `bench:pipeline`), C uploads in flight on both sides. The KMS emulator (5 ms per request, no quotas), a
 * private Redis and keyferry's API (which takes the batch) run natively and are not counted: the figure is what
 * the sender's own process runs per upload (user space; the kernel's part of the socket calls is not counted),
 * over N uploads after W not counted (JIT, caches, connection pools). Each side uploads into an emulator region
 * of its own, so both find as many keys there.
 * The ratio bare / keyferry is the throughput ratio `bench:pipeline` would show if both senders were bound by
 * their own CPU on a machine of steady speed (its goal: keyferry at least 0.8 of the bare sequence).
 */
import { parseArgs } from 'node:util';
import { startApi } from '../api/server.js';
import { signToken } from '../shared/auth.js';
import { loadConfig } from '../shared/config.js';
import { createLogger } from '../shared/logger.js';
import { EMULATOR_ACCESS_KEY, EMULATOR_SECRET_KEY } from '../test/helpers/stack.js';
import { BENCH_TAGS, fmt, intParam, machineLine, pipelineEnv, printTable, runBatch, seed, startPrivateRedis } from './lib-bench.js';
import { lineMatching, requireValgrind, startCounted, type CountedProcess } from './lib-callgrind.js';
import { startEmulatorProcess } from './lib-emulator.js';

const { values } = parseArgs({ options: { uploads: { type: 'string' }, warmup: { type: 'string' }, concurrency: { type: 'string' } } });
const N = intParam(values.uploads, 'BENCH_N', 400);
const WARMUP = intParam(values.warmup, 'BENCH_WARMUP', 300, 0);
const CONCURRENCY = intParam(values.concurrency, 'BENCH_CONCURRENCY', 8);
const LATENCY_MS = 5;
const KEY_SPEC = 'RSA_2048';
const ACCOUNT_ID = '123456789012';
const KMS_TIMEOUT_MS = 60_000;
const GOAL = 0.8;
/** Everything under valgrind is tens of times slower: long enough for the warm-up of either side. */
const SLOW_MS = 3_600_000;

requireValgrind('bench:pipeline-instructions');

const redis = await startPrivateRedis();
const emulator = await startEmulatorProcess({ accounts: { [EMULATOR_ACCESS_KEY]: ACCOUNT_ID }, latencyMs: LATENCY_MS, keepAliveTimeoutMs: SLOW_MS });
const env = pipelineEnv('bench-pipeline-instructions', { redisUrl: redis.url, concurrency: CONCURRENCY, kmsTimeoutMs: KMS_TIMEOUT_MS, keySpec: KEY_SPEC });
const config = loadConfig(env);
const api = await startApi(config, createLogger('silent'));
const started: CountedProcess[] = [];

/** Waits for a line of a process under callgrind, or fails if it exits first. */
const awaitLine = (p: CountedProcess, re: RegExp) => Promise.race([lineMatching(p.lines, re, SLOW_MS), p.exited]);

try {
  const bare = startCounted(['bench/lib-bare-pipeline-child.ts'], {
    BENCH_EMULATOR_URL: emulator.url,
    BENCH_REGION: 'eu-west-1',
    BENCH_N: String(N),
    BENCH_WARMUP: String(WARMUP),
    BENCH_CONCURRENCY: String(CONCURRENCY),
    BENCH_KEY_SPEC: KEY_SPEC,
    BENCH_TIMEOUT_MS: String(KMS_TIMEOUT_MS),
  });
  started.push(bare);
  await awaitLine(bare, /^warm$/);
  bare.count(true);
  bare.stdin.write('go\n');
  await awaitLine(bare, /^done$/);
  bare.count(false);
  bare.stdin.write('exit\n');
  const bareInstructions = await bare.stop(false);

  const worker = startCounted(['worker/main.ts'], env);
  started.push(worker);
  await awaitLine(worker, /"msg":"worker started"/);
  const token = await signToken({ secret: config.JWT_SECRET, account: 'bench' });
  await seed(api.url, token, '/api/v1/cckm/aws/kms', { name: 'kms', account_id: ACCOUNT_ID, regions: ['us-east-1'], aws_access_key_id: EMULATOR_ACCESS_KEY, aws_secret_access_key: EMULATOR_SECRET_KEY, endpoint: emulator.url });
  await seed(api.url, token, '/api/v1/vault/keys2', { name: 'bench-key', algorithm: 'AES', size: 256 });
  const batch = async (phase: string, n: number) => {
    const items = Array.from({ length: n }, (_, i) => ({ source_key_identifier: 'bench-key', region: 'us-east-1', kms: 'kms', aws_param: { Alias: `kf-${phase}-${i}`, Tags: BENCH_TAGS } }));
    const run = await Promise.race([runBatch(api.url, token, items, 250, SLOW_MS), worker.exited]);
    if (run.counts.succeeded !== n) throw new Error(`keyferry ${phase}: ${JSON.stringify(run.counts)}`);
  };
  if (WARMUP > 0) await batch('warm', WARMUP);
  worker.count(true);
  await batch('counted', N);
  worker.count(false);
  const keyferryInstructions = await worker.stop();

  const perUpload = (instructions: number) => instructions / N / 1e6;
  console.log(machineLine());
  console.log(`pipeline instructions: ${N} uploads counted after ${WARMUP} not counted, ${CONCURRENCY} in flight, emulator ${LATENCY_MS} ms per request, wrapping key ${KEY_SPEC}; valgrind callgrind, node --single-threaded`);
  printTable(
    ['sender (the process counted)', 'million instructions per upload'],
    [
      ['bare @aws-sdk/client-kms sequence', fmt(perUpload(bareInstructions), 2)],
      ['keyferry worker (BullMQ job, records, KMS requests; KMS quotas off, LOG_LEVEL=info)', fmt(perUpload(keyferryInstructions), 2)],
    ],
  );
  const ratio = bareInstructions / keyferryInstructions;
  console.log(`ratio bare / keyferry instructions per upload: ${ratio.toFixed(3)} (pipeline goal, if both were CPU-bound on a steady machine: ≥ ${GOAL}: ${ratio >= GOAL ? 'met' : 'NOT met'})`);
} finally {
  await Promise.all(started.map((p) => p.kill()));
  await api.close();
  await emulator.close();
  await redis.stop();
}
process.exit(0);
