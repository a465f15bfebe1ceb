import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DEFAULT_KMS_QUOTAS } from '../shared/kms-quotas.js';
import { JOB_TAG_KEY } from '../worker/result.js';
import { monitorCommands } from './helpers/redis-dump.js';
import { seedKms, seedLocalKey, startStack, waitForJob, type TestStack } from './helpers/stack.js';
import { Keyspace } from '../shared/stores/keyspace.js';

/**
 * AWS's quotas sped up SCALE times, enforced alike by the emulator (ThrottlingException above them) and by
 * keyferry (KMS_QUOTAS). GetParametersForImport (1/s at AWS) binds: SCALE per second per account and region.
 */
const SCALE = 10;
const QUOTAS = Object.fromEntries(Object.entries(DEFAULT_KMS_QUOTAS).map(([op, rps]) => [op, rps * SCALE]));
const GPFI_RATE = DEFAULT_KMS_QUOTAS.GetParametersForImport * SCALE;
/** Access key → AWS account, in the emulator; one KMS connection per account. */
const ACCOUNTS = { AKIAQUOTATESTA00001: '111111111111', AKIAQUOTATESTB00002: '222222222222', AKIAQUOTATESTC00003: '333333333333' };
const [A, B, C] = Object.values(ACCOUNTS) as [string, string, string];
const REGIONS = ['eu-west-1', 'us-east-1'] as const;
/** kms-c keeps to a quota of its own: GetParametersForImport slots 500 ms apart. */
const C_GPFI_RATE = 2;

let stack: TestStack;
let token: string;

const item = (kms: string, region: string) => ({ source_key_identifier: 'quota-key', kms, region });

async function submitBatch(items: object[]): Promise<{ id: string; at: number }> {
  const at = Date.now();
  const res = await stack.call('POST', '/api/v1/cckm/aws/upload-key/batch', { token, body: { items } });
  expect(res.status).toBe(202);
  return { id: res.body.id, at };
}

/** Polls `done` every 20 ms until it holds, for at most 30 s. */
async function until(done: () => Promise<boolean>): Promise<void> {
  for (const deadline = Date.now() + 30_000; !(await done()); ) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${done.toString()}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

const getBatch = async (id: string) => (await stack.call('GET', `/api/v1/batches/${id}`, { token })).body;

async function waitForBatch(id: string) {
  await until(async () => (await getBatch(id)).status === 'completed');
  return getBatch(id);
}

/** Arrival times at the emulator of GetParametersForImport requests in one account and region. */
const importParamsCalls = (accountId: string, region: string) =>
  stack.emulator
    .requests()
    .filter((r) => r.op === 'GetParametersForImport' && r.accountId === accountId && r.region === region)
    .map((r) => r.at);

beforeAll(async () => {
  const kmsQuotas = Object.entries(QUOTAS).map(([op, rps]) => `${op}=${rps}`).join(',');
  stack = await startStack({ name: 'quotas', env: { KMS_QUOTAS: kmsQuotas }, emulator: { quotas: QUOTAS, accounts: ACCOUNTS, recordRequests: true } });
  await stack.startWorker();
  token = await stack.token('quota');
  const [keyA, keyB, keyC] = Object.keys(ACCOUNTS) as [string, string, string];
  await seedKms(stack, token, { name: 'kms-a', account_id: A, regions: REGIONS, aws_access_key_id: keyA });
  await seedKms(stack, token, { name: 'kms-b', account_id: B, regions: REGIONS, aws_access_key_id: keyB });
  await seedKms(stack, token, { name: 'kms-c', account_id: C, regions: REGIONS, aws_access_key_id: keyC, quotas: { GetParametersForImport: C_GPFI_RATE } });
  await seedLocalKey(stack, token, 'quota-key');
});
afterAll(async () => {
  await stack?.close();
});

describe('AWS KMS quotas per account and region, kept by all workers together', () => {
  it('when a KMS connection sets quotas, then they are checked, stored and shown', async () => {
    const list = await stack.call('GET', '/api/v1/cckm/aws/kms', { token });
    const byName = Object.fromEntries(list.body.resources.map((c: { name: string; quotas: object }) => [c.name, c.quotas]));
    expect(byName).toEqual({ 'kms-a': {}, 'kms-b': {}, 'kms-c': { GetParametersForImport: C_GPFI_RATE } });

    const bad = await stack.call('POST', '/api/v1/cckm/aws/kms', { token, body: { name: 'bad', account_id: A, regions: ['eu-west-1'], quotas: { CreateKey: 0, Frobnicate: 1 } } });
    expect(bad.status).toBe(400);
    expect(bad.body.errors.map((e: { path: string }) => e.path).sort()).toEqual(['quotas.CreateKey', 'quotas.Frobnicate']);
  });

  it('when 200 jobs for two accounts in two regions run on two workers, then all succeed without one ThrottlingException and no account and region goes over its quota', async () => {
    const perBucket = 50;
    const buckets = [A, B].flatMap((accountId) => REGIONS.map((region) => ({ accountId, region, kms: accountId === A ? 'kms-a' : 'kms-b' })));
    const items = Array.from({ length: perBucket * buckets.length }, (_, i) => {
      const { kms, region } = buckets[i % buckets.length] as (typeof buckets)[number];
      return item(kms, region);
    });
    const batch = await submitBatch(items);
    const done = await waitForBatch(batch.id);

    expect(done.counts).toMatchObject({ succeeded: items.length, failed: 0 });
    expect(stack.emulator.throttledCount()).toBe(0);
    // Waiting for a quota never counts as an attempt.
    const jobs = (await stack.call('GET', `/api/v1/batches/${batch.id}/jobs?limit=1000`, { token })).body.jobs;
    expect(jobs.map((j: { attempts: number }) => j.attempts)).toEqual(items.map(() => 1));

    // Never above the quota over WINDOW_MS, while every bucket has more work than its quota allows in that time.
    // How close to the quota keyferry gets is a speed figure, measured by bench/quota.ts (npm run bench:quota),
    // not asserted here: on a loaded machine the workers may fall behind the quota without anything being wrong.
    const WINDOW_MS = 4000;
    const allowed = (GPFI_RATE * WINDOW_MS) / 1000;
    for (const { accountId, region } of buckets) {
      const calls = importParamsCalls(accountId, region);
      expect(calls).toHaveLength(perBucket);
      // At most the quota (and the one request a bucket allows at once) in any window of WINDOW_MS.
      for (const start of calls) {
        const inWindow = calls.filter((at) => at >= start && at < start + WINDOW_MS).length;
        expect(inWindow, `${accountId} ${region} from ${start}`).toBeLessThanOrEqual(1 + allowed);
      }
    }
  });

  it('when one account and region is flooded, then a job of another account behind the flood finishes within seconds', async () => {
    const floodSize = 60;
    const flood = await submitBatch(Array.from({ length: floodSize }, () => item('kms-a', 'eu-west-1')));
    const other = await submitBatch([item('kms-b', 'eu-west-1')]);
    await waitForBatch(other.id);
    expect(Date.now() - other.at).toBeLessThan(3000);

    // The flood is still running: its jobs wait for their slots in the queue, not in the workers.
    expect((await getBatch(flood.id)).counts.succeeded).toBeLessThan(floodSize / 2);
    const waiting = (await stack.call('GET', `/api/v1/batches/${flood.id}/jobs?limit=1000`, { token })).body.jobs.filter((j: { status: string }) => ['queued', 'retrying'].includes(j.status));
    expect(waiting.length).toBeGreaterThan(0);
    for (const job of waiting) {
      // Nothing made in AWS yet: still queued, no attempt counted. A key made: retrying, waiting to import.
      expect(job).toMatchObject(job.status === 'queued' ? { attempts: 0, error: null } : { attempts: 1, error: null, step: 'get_import_params' });
    }

    expect((await waitForBatch(flood.id)).counts).toMatchObject({ succeeded: floodSize, failed: 0 });
    expect(stack.emulator.throttledCount()).toBe(0);
  });

  it('when a single upload goes to an account and region a batch waits on, then it takes the slots the batch reserved and finishes first', async () => {
    const flood = await submitBatch(Array.from({ length: 60 }, () => item('kms-a', 'us-east-1')));
    // Much of the batch has its key and a reserved GetParametersForImport slot: seconds of them.
    await until(async () => (await getBatch(flood.id)).counts.retrying >= 30);
    const at = Date.now();
    const res = await stack.call('POST', '/api/v1/cckm/aws/upload-key', { token, body: item('kms-a', 'us-east-1') });
    expect(await waitForJob(stack, token, res.body.id)).toMatchObject({ status: 'succeeded', attempts: 1 });
    // Behind the batch it would wait for 30 slots or more: 3 s.
    expect(Date.now() - at).toBeLessThan(2000);
    expect((await getBatch(flood.id)).counts.succeeded).toBeLessThan(30);
    expect((await waitForBatch(flood.id)).counts).toMatchObject({ succeeded: 60, failed: 0 });
    expect(stack.emulator.throttledCount()).toBe(0);
  });

  it('when a batch waiting for its quota is canceled, then the jobs that made nothing in AWS are canceled and make nothing', async () => {
    const size = 60;
    const flood = await submitBatch(Array.from({ length: size }, () => item('kms-b', 'us-east-1')));
    await until(async () => (await getBatch(flood.id)).counts.succeeded > 0);
    const res = await stack.call('DELETE', `/api/v1/batches/${flood.id}`, { token });
    expect(res.body.canceled).toBeGreaterThan(size / 2);

    const done = await waitForBatch(flood.id);
    expect(done.counts).toMatchObject({ canceled: res.body.canceled, succeeded: size - res.body.canceled, failed: 0 });
    const canceled = new Set((await stack.call('GET', `/api/v1/batches/${flood.id}/jobs?status=canceled&limit=1000`, { token })).body.jobs.map((j: { id: string }) => j.id));
    expect(stack.emulator.keys().filter((k) => k.tags.some((t) => t.TagKey === JOB_TAG_KEY && canceled.has(t.TagValue)))).toEqual([]);
  });

  it('when KMS throttles a request anyway, then every worker gives up a slot and the job succeeds on its retry', async () => {
    stack.emulator.injectFault({ op: 'GetParametersForImport', error: 'ThrottlingException', count: 1 });
    const res = await stack.call('POST', '/api/v1/cckm/aws/upload-key', { token, body: item('kms-c', 'eu-west-1') });
    const job = await waitForJob(stack, token, res.body.id);
    expect(job).toMatchObject({ status: 'succeeded', attempts: 2 });

    // The retry's slot would be the next one, 1/rate after the throttled request; the throttle gave it up.
    const [throttled = 0, retried = 0] = importParamsCalls(C, 'eu-west-1');
    const interval = 1000 / C_GPFI_RATE;
    expect(retried - throttled).toBeGreaterThanOrEqual(2 * interval - 50);
  });

  it('when one upload runs, then each of its KMS requests takes exactly one slot', async () => {
    // The slots a bucket grants: the script's SET of the bucket's next free slot, as Redis's MONITOR shows it.
    const slots = new Map<string, number>();
    const bucket = `${stack.config.KEYFERRY_PREFIX}:quota:{${A}:eu-west-1}:`;
    const stop = await monitorCommands(stack.config.REDIS_URL, (args) => {
      const key = args[1] ?? '';
      const op = args[0]?.toLowerCase() === 'set' && key.startsWith(bucket) ? key.slice(bucket.length) : undefined;
      if (op) slots.set(op, (slots.get(op) ?? 0) + 1);
    });
    const requests = stack.emulator.callCount();
    try {
      const res = await stack.call('POST', '/api/v1/cckm/aws/upload-key', { token, body: { ...item('kms-a', 'eu-west-1'), aws_param: { Alias: 'one-slot-each' } } });
      expect(await waitForJob(stack, token, res.body.id)).toMatchObject({ status: 'succeeded', attempts: 1 });
    } finally {
      stop();
    }
    const ops = ['CreateKey', 'CreateAlias', 'GetParametersForImport', 'ImportKeyMaterial', 'DescribeKey', 'GetKeyPolicy', 'ListAliases', 'ListResourceTags', 'GetKeyRotationStatus'];
    expect(stack.emulator.callCount() - requests).toBe(ops.length);
    expect(Object.fromEntries(slots)).toEqual(Object.fromEntries(ops.map((op) => [op, 1])));
  });

  it('when the slot of CreateKey cannot be taken (Redis answers an error), then no CreateKey went out and the retry does not look for a key', async () => {
    // A hash where the bucket's next free slot should be: the slot script's GET of it fails with WRONGTYPE.
    const bucket = new Keyspace(stack.config.KEYFERRY_PREFIX).kmsQuota(B, 'us-east-1', 'CreateKey');
    await stack.redis.del(bucket);
    await stack.redis.hset(bucket, 'broken', '1');
    const listKeys = stack.emulator.callCount('ListKeys');
    const createKeys = stack.emulator.callCount('CreateKey');
    let jobId = '';
    try {
      const res = await stack.call('POST', '/api/v1/cckm/aws/upload-key', { token, body: item('kms-b', 'us-east-1') });
      jobId = res.body.id;
      await until(async () => (await stack.call('GET', `/api/v1/jobs/${jobId}`, { token })).body.status === 'retrying');
      expect(stack.emulator.callCount('CreateKey')).toBe(createKeys);
    } finally {
      await stack.redis.del(bucket);
    }
    const job = await waitForJob(stack, token, jobId);
    expect(job).toMatchObject({ status: 'succeeded' });
    expect(job.attempts).toBeGreaterThan(1);
    expect(stack.emulator.callCount('CreateKey') - createKeys).toBe(1);
    expect(stack.emulator.callCount('ListKeys')).toBe(listKeys);
  });
});

describe('KMS_QUOTAS with operations turned off', () => {
  let offStack: TestStack;
  beforeAll(async () => {
    offStack = await startStack({ name: 'quotas-off', env: { KMS_QUOTAS: 'CreateKey=off,GetParametersForImport=off' } });
  });
  afterAll(async () => {
    await offStack?.close();
  });

  it('when an operation is off, then its requests take no slot in Redis, the other operations still do, and uploads succeed', async () => {
    const offToken = await offStack.token('quota-off');
    await seedKms(offStack, offToken, { name: 'kms' });
    await seedLocalKey(offStack, offToken, 'off-key');
    // Every command on this stack's quota buckets, Lua's own included, as Redis's MONITOR shows them.
    const bucketPrefix = `${offStack.config.KEYFERRY_PREFIX}:quota:`;
    const touched = new Set<string>();
    const stop = await monitorCommands(offStack.config.REDIS_URL, (args) => {
      for (const a of args) if (a.startsWith(bucketPrefix)) touched.add(/\}:(\w+)/.exec(a)?.[1] ?? a);
    });
    try {
      const res = await offStack.call('POST', '/api/v1/cckm/aws/upload-key', { token: offToken, body: { source_key_identifier: 'off-key', kms: 'kms', region: 'us-east-1', aws_param: { Alias: 'off-key' } } });
      expect(await waitForJob(offStack, offToken, res.body.id)).toMatchObject({ status: 'succeeded', attempts: 1 });
    } finally {
      stop();
    }
    expect(touched).toContain('CreateAlias');
    expect(touched).toContain('ImportKeyMaterial');
    expect(touched).not.toContain('CreateKey');
    expect(touched).not.toContain('GetParametersForImport');
  });
});
