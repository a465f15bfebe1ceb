/**
 * Quota efficiency (run by hand: `npm run bench:quota`; sizes by flag or environment: `--jobs J` / BENCH_JOBS
 * per account/region, `--buckets M` / BENCH_BUCKETS account/regions, `--scale F` / BENCH_QUOTA_SCALE,
 * `--workers W` / BENCH_WORKERS, `--concurrency C` / BENCH_CONCURRENCY).
 *
 * The KMS emulator enforces AWS's per-account/region request quotas × F (GetParametersForImport, 1/s at AWS,
 * binds: F per second), and keyferry is told the same quotas (KMS_QUOTAS). M account/regions (each its own
 * AWS account, access key and KMS connection, and its own region), J jobs each, submitted as one batch whose
 * items alternate between them. Per account/region: uploads/s (jobs succeeded / from the submission to its last
 * job's finished_at) divided by its binding quota, and the steady rate of its GetParametersForImport requests
 * as the emulator saw them. Then a naive uploader on the same emulator and quotas: the same SDK calls for all
 * M × J uploads in one Promise.all, the SDK's default retries (standard mode, 3 attempts). Prints throttling
 * errors (the emulator's counter), failed jobs and completion times of both, and whether keyferry kept
 * ≥ 95 % of every quota with zero failed jobs. API and workers run in this process; Redis is a private
 * redis-server (appendfsync everysec), stopped at the end.
 */
import { randomBytes } from 'node:crypto';
import { parseArgs } from 'node:util';
import { KMSClient } from '@aws-sdk/client-kms';
import { startApi } from '../api/server.js';
import { signToken } from '../shared/auth.js';
import { loadConfig } from '../shared/config.js';
import { DEFAULT_KMS_QUOTAS } from '../shared/kms-quotas.js';
import { createLogger } from '../shared/logger.js';
import { KmsEmulator } from '../test/kms-emulator/emulator.js';
import { EMULATOR_SECRET_KEY, testEnv } from '../test/helpers/stack.js';
import { startWorker, type WorkerHandle } from '../worker/runner.js';
import { bareUpload, BareUploadError, batchJobs, BENCH_JOB_ENV, fmt, intParam, kmsQuotasEnv, machineLine, printTable, runBatch, scaledQuotas, seed, startPrivateRedis } from './lib-bench.js';

const { values } = parseArgs({
  options: { jobs: { type: 'string' }, buckets: { type: 'string' }, scale: { type: 'string' }, workers: { type: 'string' }, concurrency: { type: 'string' } },
});
const JOBS = intParam(values.jobs, 'BENCH_JOBS', 100);
const BUCKETS = intParam(values.buckets, 'BENCH_BUCKETS', 3);
const SCALE = intParam(values.scale, 'BENCH_QUOTA_SCALE', 10);
const WORKERS = intParam(values.workers, 'BENCH_WORKERS', 2);
const CONCURRENCY = intParam(values.concurrency, 'BENCH_CONCURRENCY', 8);
const GOAL = 0.95;
const KEY_SPEC = 'RSA_2048';
const BINDING_OP = 'GetParametersForImport';
const QUOTAS = scaledQuotas(SCALE);
const BINDING_RATE = DEFAULT_KMS_QUOTAS[BINDING_OP] * SCALE;
const REGIONS = ['eu-west-1', 'us-east-1', 'ap-south-1', 'eu-central-1', 'us-west-2', 'ap-northeast-1', 'eu-west-2', 'us-east-2', 'ca-central-1'];
if (BUCKETS > REGIONS.length) throw new Error(`at most ${REGIONS.length} account/regions`);
const TAGS = [{ TagKey: 'team', TagValue: 'bench' }];

/** Account/region k: AWS account kkkkkkkkkkkk (its own access key and KMS connection) in its own region. */
const buckets = Array.from({ length: BUCKETS }, (_, k) => ({
  k,
  accountId: String(k + 1).repeat(12).slice(0, 12),
  accessKey: `AKIABENCHQUOTA${String(k).padStart(6, '0')}`,
  region: REGIONS[k] as string,
  kms: `kms-${k}`,
}));
const label = (b: (typeof buckets)[number]) => `${b.accountId}/${b.region}`;

const redis = await startPrivateRedis();
const emulator = new KmsEmulator({ accounts: Object.fromEntries(buckets.map((b) => [b.accessKey, b.accountId])), quotas: QUOTAS, recordRequests: true });
await emulator.start();
const env = testEnv('bench-quota', {
  REDIS_URL: redis.url,
  LOG_LEVEL: 'silent',
  WORKER_CONCURRENCY: String(CONCURRENCY),
  KMS_QUOTAS: kmsQuotasEnv(QUOTAS),
  DEFAULT_WRAPPING_KEY_SPEC: KEY_SPEC,
  ...BENCH_JOB_ENV,
});
const config = loadConfig(env);
const logger = createLogger('silent');
const api = await startApi(config, logger);
const workers: WorkerHandle[] = [];
const clients: KMSClient[] = [];

/** Arrival times of the binding operation's requests at the emulator, per account/region, within [from, to). */
const bindingCalls = (from: number, to: number) =>
  buckets.map((b) => emulator.requests().filter((r) => r.op === BINDING_OP && r.accountId === b.accountId && r.region === b.region && r.at >= from && r.at < to).map((r) => r.at));
/** Requests per second between the first and the last of `times` (the steady rate, ramp-up left out). */
const steadyRate = (times: number[]) => (times.length < 2 ? NaN : (times.length - 1) / (((times.at(-1) as number) - (times[0] as number)) / 1000));

try {
  for (let w = 0; w < WORKERS; w++) workers.push(await startWorker(config, logger));
  const token = await signToken({ secret: config.JWT_SECRET, account: 'bench' });
  for (const b of buckets) {
    await seed(api.url, token, '/api/v1/cckm/aws/kms', { name: b.kms, account_id: b.accountId, regions: [b.region], aws_access_key_id: b.accessKey, aws_secret_access_key: EMULATOR_SECRET_KEY, endpoint: emulator.url });
  }
  await seed(api.url, token, '/api/v1/vault/keys2', { name: 'bench-key', algorithm: 'AES', size: 256 });
  // The emulator's RSA wrapping keys are made on first use (not part of any quota): made before the runs.
  const warm = new KMSClient({ region: 'warm-up-1', endpoint: emulator.url, credentials: { accessKeyId: 'AKIABENCHWARMUP00000', secretAccessKey: EMULATOR_SECRET_KEY } });
  for (let i = 0; i < 2; i++) await bareUpload(warm, { alias: `warm-${i}`, jobTag: `warm.${i}`, material: randomBytes(32), keySpec: KEY_SPEC, tags: TAGS });
  warm.destroy();

  // keyferry: one batch, items alternating between the account/regions.
  const items = Array.from({ length: JOBS * BUCKETS }, (_, i) => {
    const b = buckets[i % BUCKETS] as (typeof buckets)[number];
    return { source_key_identifier: 'bench-key', region: b.region, kms: b.kms, aws_param: { Alias: `kf-${b.k}-${Math.floor(i / BUCKETS)}`, Tags: TAGS } };
  });
  const throttles0 = emulator.throttledCount();
  const run = await runBatch(api.url, token, items, 100);
  const kfThrottles = emulator.throttledCount() - throttles0;
  const jobs = await batchJobs(api.url, token, run.id);
  const kfEnd = Math.max(run.finishedAt, ...jobs.map((j) => Date.parse(j.finished_at ?? '')).filter(Number.isFinite));
  const kfCalls = bindingCalls(run.submittedAt, kfEnd + 1);
  const kf = buckets.map((b, k) => {
    const mine = jobs.filter((j) => j.batch_index % BUCKETS === b.k);
    const ok = mine.filter((j) => j.status === 'succeeded');
    const last = Math.max(...ok.map((j) => Date.parse(j.finished_at as string)));
    return {
      succeeded: ok.length,
      failed: mine.filter((j) => j.status === 'failed').length,
      retried: mine.filter((j) => j.attempts > 1).length,
      rate: ok.length / ((last - run.submittedAt) / 1000),
      steady: steadyRate(kfCalls[k] as number[]),
    };
  });
  const kfFailed = run.counts.failed ?? 0;

  // The naive uploader: everything at once, the SDK's default retries, one client per account/region.
  const byBucket = new Map(buckets.map((b) => [b.k, new KMSClient({ region: b.region, endpoint: emulator.url, credentials: { accessKeyId: b.accessKey, secretAccessKey: EMULATOR_SECRET_KEY } })]));
  clients.push(...byBucket.values());
  const naiveTag = randomBytes(4).toString('hex');
  const material = randomBytes(32);
  const throttles1 = emulator.throttledCount();
  const naiveStart = Date.now();
  const outcomes = await Promise.all(
    Array.from({ length: JOBS * BUCKETS }, async (_, i) => {
      const b = buckets[i % BUCKETS] as (typeof buckets)[number];
      try {
        await bareUpload(byBucket.get(b.k) as KMSClient, { alias: `naive-${b.k}-${Math.floor(i / BUCKETS)}`, jobTag: `${naiveTag}.${i}`, material, keySpec: KEY_SPEC, tags: TAGS });
        return { k: b.k, at: Date.now(), error: undefined };
      } catch (err) {
        return { k: b.k, at: Date.now(), error: err instanceof BareUploadError ? `${err.step}: ${err.cause.name}` : String(err) };
      }
    }),
  );
  const naiveEnd = Date.now();
  const naiveThrottles = emulator.throttledCount() - throttles1;
  const naive = buckets.map((b) => {
    const mine = outcomes.filter((o) => o.k === b.k);
    const ok = mine.filter((o) => o.error === undefined);
    const last = Math.max(...ok.map((o) => o.at));
    return { succeeded: ok.length, failed: mine.length - ok.length, rate: ok.length ? ok.length / ((last - naiveStart) / 1000) : 0 };
  });
  const naiveFailures = new Map<string, number>();
  for (const o of outcomes) if (o.error) naiveFailures.set(o.error, (naiveFailures.get(o.error) ?? 0) + 1);
  const orphans = emulator.keys().filter((key) => key.keyState === 'PendingImport' && key.tags.some((t) => t.TagValue.startsWith(`${naiveTag}.`))).length;

  console.log(machineLine());
  console.log(`redis ${redis.version} (private, appendfsync everysec); emulator, API and ${WORKERS} worker(s) × concurrency ${CONCURRENCY} in this process`);
  console.log(`quota efficiency: AWS's KMS quotas × ${SCALE} in the emulator and in KMS_QUOTAS (binding: ${BINDING_OP} ${BINDING_RATE}/s per account/region), ${BUCKETS} account/regions × ${JOBS} jobs, wrapping key ${KEY_SPEC}`);
  printTable(
    ['account/region', 'binding quota /s', 'keyferry uploads/s', 'keyferry ÷ quota', `keyferry ${BINDING_OP} steady /s ÷ quota`, 'keyferry failed', 'naive uploads/s (succeeded only)', 'naive ÷ quota', 'naive failed'],
    buckets.map((b, k) => {
      const x = kf[k] as (typeof kf)[number];
      const y = naive[k] as (typeof naive)[number];
      return [label(b), BINDING_RATE, fmt(x.rate, 2), fmt(x.rate / BINDING_RATE, 3), fmt(x.steady / BINDING_RATE, 3), x.failed, fmt(y.rate, 2), fmt(y.rate / BINDING_RATE, 3), y.failed];
    }),
  );
  console.log('');
  printTable(
    ['uploader', 'jobs', 'succeeded', 'failed', 'throttling errors (emulator)', 'jobs retried', 'completion s', 'keys left without material'],
    [
      ['keyferry (batch, quota slots in Redis)', JOBS * BUCKETS, kf.reduce((s, x) => s + x.succeeded, 0), kfFailed, kfThrottles, kf.reduce((s, x) => s + x.retried, 0), fmt((kfEnd - run.submittedAt) / 1000, 2), 0],
      ['naive Promise.all, SDK standard retries (3 attempts)', JOBS * BUCKETS, naive.reduce((s, x) => s + x.succeeded, 0), naive.reduce((s, x) => s + x.failed, 0), naiveThrottles, 'n/a', fmt((naiveEnd - naiveStart) / 1000, 2), orphans],
    ],
  );
  if (naiveFailures.size > 0) console.log(`naive failures: ${[...naiveFailures].sort((a, b) => b[1] - a[1]).map(([e, n]) => `${n} × ${e}`).join('; ')}`);
  const worst = Math.min(...kf.map((x) => x.rate / BINDING_RATE));
  console.log(`keyferry uploads/s ÷ quota, worst account/region: ${worst.toFixed(3)}; failed jobs: ${kfFailed}; throttling errors: ${kfThrottles}`);
  console.log(`goal ≥ ${GOAL * 100}% of quota on every account/region with zero failed jobs: ${worst >= GOAL && kfFailed === 0 ? 'met' : 'NOT met'}`);
} finally {
  for (const c of clients) c.destroy();
  await Promise.all(workers.map((w) => w.close()));
  await api.close();
  await emulator.close();
  await redis.stop();
}

// Something (a BullMQ or SDK handle) may keep the event loop alive after the clean-up: end the run explicitly.
process.exit(0);
