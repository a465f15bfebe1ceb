import { readFileSync } from 'node:fs';
import { afterAll, describe, expect, it } from 'vitest';
import { runEntry } from './helpers/child.js';
import { KmsEmulator } from './kms-emulator/emulator.js';
import { OwnRedis, freePort } from './helpers/redis-server.js';
import { EMULATOR_ACCESS_KEY, seedKms, seedLocalKey, startStack, waitForBatch, waitForJob, type TestStack } from './helpers/stack.js';

const example = JSON.parse(readFileSync(new URL('./fixtures/spec-example-request.json', import.meta.url), 'utf8')) as Record<string, unknown>;
const items = (n: number, tag: string) => Array.from({ length: n }, (_, i) => ({ source_key_identifier: 'test-key', region: 'ap-south-1', kms: 'kms', aws_param: { Alias: `${tag}-${i}` } }));
/** Many quick retries. */
const fastRetries = { JOB_ATTEMPTS: '40', JOB_BACKOFF_MS: '20', JOB_BACKOFF_MAX_MS: '200', INTAKE_BURST: '1000' };
/**
 * Quick retries, and a job whose worker stopped answering taken up again within about 3 s. Only for tests of
 * that: on a loaded machine a worker can miss a 2 s lock, and its job then runs twice (a second key, scheduled
 * for deletion, which tests counting keys per job would see).
 */
const fastRecovery = { ...fastRetries, WORKER_LOCK_DURATION_MS: '2000', WORKER_STALLED_INTERVAL_MS: '1000' };


/** Every job of the batch has exactly one key in the emulator, and every key there belongs to a job. */
function expectOneKeyPerJob(stack: TestStack, jobIds: string[]) {
  const owners = stack.emulator.keys().map((k) => k.tags.find((t) => t.TagKey === 'keyferry:job-id')?.TagValue);
  for (const id of jobIds) expect(owners.filter((o) => o === id), id).toHaveLength(1);
  expect(owners.every((o) => o !== undefined && jobIds.includes(o))).toBe(true);
}

const cleanups: (() => Promise<void>)[] = [];
afterAll(async () => {
  for (const fn of cleanups.reverse()) await fn();
});

/** A stack of the test's own, closed after the file, with account acme's KMS connection (`kms` overrides) and local key `test-key`. */
async function seededStack(opts: Parameters<typeof startStack>[0], kms: Record<string, unknown> = {}): Promise<{ stack: TestStack; token: string }> {
  const stack = await startStack(opts);
  cleanups.push(() => stack.close());
  const token = await stack.token('acme');
  await seedKms(stack, token, kms);
  await seedLocalKey(stack, token, 'test-key');
  return { stack, token };
}

describe('faults', () => {
  it('when Redis crashes and comes back during a batch, then the API answers 503 meanwhile and every accepted job completes with one key', async () => {
    const redis = await OwnRedis.start();
    cleanups.push(() => redis.stop());
    const { stack, token } = await seededStack({ name: 'faults-redis', env: { REDIS_URL: redis.url, ...fastRecovery } });
    stack.emulator.setLatency(20);

    const res = await stack.call('POST', '/api/v1/cckm/aws/upload-key/batch', { token, body: { items: items(30, 'rr') } });
    expect(res.status).toBe(202);
    for (let i = 0; i < 200; i++) {
      const b = await stack.call('GET', `/api/v1/batches/${res.body.id}`, { token });
      if (b.body.counts.succeeded >= 3) break;
      await new Promise((r) => setTimeout(r, 25));
    }

    await redis.kill();
    const t0 = Date.now();
    const during = await stack.call('POST', '/api/v1/cckm/aws/upload-key', { token, body: example });
    expect(Date.now() - t0).toBeLessThan(3000);
    expect(during.status).toBe(503);
    expect(during.headers.get('content-type')).toMatch(/^application\/problem\+json/);
    expect((await stack.call('GET', '/readyz')).status).toBe(503);

    await new Promise((r) => setTimeout(r, 1000));
    await redis.restart();
    const done = await waitForBatch(stack, token, res.body.id, 45_000);
    expect(done.counts).toMatchObject({ succeeded: 30, failed: 0, canceled: 0 });
    expect((await stack.call('GET', '/readyz')).status).toBe(200);
    expectOneKeyPerJob(stack, Array.from({ length: 30 }, (_, i) => `${res.body.id}.${i}`));
  }, 90_000);

  it('when Redis goes away while a request waits (Prefer: wait), then the accepted job is answered 202, not 503', async () => {
    const redis = await OwnRedis.start();
    cleanups.push(() => redis.stop());
    const { stack, token } = await seededStack({ name: 'faults-wait', env: { REDIS_URL: redis.url }, worker: false });

    // No worker: the job stays queued, and the request waits its 2 s; Redis dies in the middle of them.
    const pending = stack.call('POST', '/api/v1/cckm/aws/upload-key', { token, body: example, headers: { prefer: 'wait=2' } });
    await new Promise((r) => setTimeout(r, 500));
    await redis.kill();
    const res = await pending;
    expect(res.status).toBe(202);
    expect(res.body).toMatchObject({ status: 'queued' });
    expect(res.headers.get('location')).toBe(`/api/v1/jobs/${res.body.id}`);
    await redis.restart(); // the stack's clean-up needs it
  }, 30_000);

  it('when KMS fails 30% of calls with 5xx and throttling, then every job completes after retries with one key', async () => {
    const { stack, token } = await seededStack({ name: 'faults-flaky', env: fastRetries });
    stack.emulator.injectFault({ op: '*', error: 'KMSInternalException', rate: 0.15 });
    stack.emulator.injectFault({ op: '*', error: 'ThrottlingException', rate: 0.15 });
    const res = await stack.call('POST', '/api/v1/cckm/aws/upload-key/batch', { token, body: { items: items(20, 'flaky') } });
    const done = await waitForBatch(stack, token, res.body.id, 45_000);
    const failedJobs = await stack.call('GET', `/api/v1/batches/${res.body.id}/jobs?status=failed`, { token });
    expect(failedJobs.body.jobs.map((j: { error: unknown }) => j.error)).toEqual([]);
    expect(done.counts).toMatchObject({ succeeded: 20, failed: 0 });
    const jobs = await stack.call('GET', `/api/v1/batches/${res.body.id}/jobs?limit=20`, { token });
    expect(jobs.body.jobs.some((j: { attempts: number }) => j.attempts > 1)).toBe(true);
    stack.emulator.clearFaults();
    expectOneKeyPerJob(stack, Array.from({ length: 20 }, (_, i) => `${res.body.id}.${i}`));

    // A permanent error still fails fast, without retries.
    stack.emulator.injectFault({ op: 'CreateKey', error: 'AccessDeniedException', count: 1 });
    const denied = await stack.call('POST', '/api/v1/cckm/aws/upload-key', { token, body: { ...example, aws_param: { Alias: 'denied-1' } } });
    expect(await waitForJob(stack, token, denied.body.id)).toMatchObject({ status: 'failed', attempts: 1, error: { code: 'aws_access_denied', retryable: false } });
  }, 60_000);

  it('when the clean-up after a permanent failure cannot schedule the key for deletion, then the failure is still recorded, without a deletion date', async () => {
    const { stack, token } = await seededStack({ name: 'faults-cleanup', env: fastRecovery });
    stack.emulator.injectFault({ op: 'ImportKeyMaterial', error: 'AccessDeniedException', count: 1 });
    stack.emulator.injectFault({ op: 'ScheduleKeyDeletion', error: 'AccessDeniedException', count: 1 });
    const res = await stack.call('POST', '/api/v1/cckm/aws/upload-key', { token, body: { ...example, aws_param: { Alias: 'cleanup-denied-1' } } });
    const job = await waitForJob(stack, token, res.body.id);
    expect(job).toMatchObject({ status: 'failed', attempts: 1, error: { code: 'aws_access_denied', retryable: false } });
    expect(job.deletion_scheduled_for ?? null).toBeNull();
    expect(stack.emulator.callCount('ScheduleKeyDeletion')).toBe(1);
    // The alias went before the key's deletion was asked for; the key stays, without material.
    const keys = stack.emulator.keys().filter((k) => k.tags.some((t) => t.TagValue === res.body.id));
    expect(keys.map((k) => [k.keyState, k.aliases])).toEqual([['PendingImport', []]]);
  }, 30_000);

  it('when KMS does not know the key it just made yet (NotFoundException, then KMSInvalidStateException), then the job is retried with that key and succeeds', async () => {
    const { stack, token } = await seededStack({ name: 'faults-settling', env: fastRecovery });
    // AWS: "KMS can return a NotFoundException if you call GetParametersForImport immediately after CreateKey".
    stack.emulator.injectFault({ op: 'GetParametersForImport', error: 'NotFoundException', status: 400, count: 1 });
    stack.emulator.injectFault({ op: 'DescribeKey', error: 'KMSInvalidStateException', status: 400, count: 1 });
    const res = await stack.call('POST', '/api/v1/cckm/aws/upload-key', { token, body: { ...example, aws_param: { Alias: 'settling-1' } } });
    expect(await waitForJob(stack, token, res.body.id)).toMatchObject({ status: 'succeeded', attempts: 3, error: null });
    expect(stack.emulator.callCount('CreateKey')).toBe(1);
    expectOneKeyPerJob(stack, [res.body.id]);
  }, 30_000);

  it('when a connection without keys runs on a worker where the AWS SDK finds no credentials, then the job fails aws_credentials_unavailable after its retries', async () => {
    const { stack, token } = await seededStack({ name: 'faults-no-credentials', worker: false, env: { JOB_ATTEMPTS: '2' } }, { aws_access_key_id: undefined, aws_secret_access_key: undefined });
    // A worker process of its own, with no AWS identity: no keys in its environment, no credentials files,
    // no instance metadata service.
    const worker = runEntry(
      'worker/main.ts',
      stack.childEnv({ AWS_EC2_METADATA_DISABLED: 'true', AWS_SHARED_CREDENTIALS_FILE: '/nonexistent/credentials', AWS_CONFIG_FILE: '/nonexistent/config' }),
    );
    cleanups.push(async () => {
      worker.proc.kill('SIGTERM');
      await worker.exited;
    });
    await worker.waitForLog('worker started', 30_000);
    const res = await stack.call('POST', '/api/v1/cckm/aws/upload-key', { token, body: { ...example, aws_param: { Alias: 'no-credentials-1' } } });
    const job = await waitForJob(stack, token, res.body.id, 20_000);
    expect(job).toMatchObject({ status: 'failed', attempts: 2, error: { code: 'aws_credentials_unavailable', retryable: true } });
    expect(stack.emulator.callCount()).toBe(0);
  }, 40_000);

  it('when KMS is slow past the timeout, then calls are aborted and retried, and the job completes once KMS is fast again', async () => {
    const { stack, token } = await seededStack({ name: 'faults-slow', env: { ...fastRecovery, KMS_TIMEOUT_MS: '300' } });
    stack.emulator.setLatency(1000);
    const res = await stack.call('POST', '/api/v1/cckm/aws/upload-key', { token, body: { ...example, aws_param: { Alias: 'slow-1' } } });
    // The slow CreateKey makes its key after the worker gave up on it (300 ms). KMS is made fast again only
    // then: a retry that looked for the key before it existed would make a second one (see the README).
    const made = () => stack.emulator.keys().some((k) => k.tags.some((t) => t.TagValue === res.body.id));
    for (let i = 0; i < 100 && !made(); i++) await new Promise((r) => setTimeout(r, 50));
    expect(made()).toBe(true);
    stack.emulator.setLatency(0);
    const job = await waitForJob(stack, token, res.body.id);
    expect(job.status).toBe('succeeded');
    expect(job.attempts).toBeGreaterThanOrEqual(2);
    // The key the timed-out CreateKey made is found by its tag and adopted: still exactly one key.
    expectOneKeyPerJob(stack, [res.body.id]);
  }, 60_000);

  it('when KMS is down when jobs start, then they retry until it is up and complete', async () => {
    const port = await freePort();
    const { stack, token } = await seededStack({ name: 'faults-down', env: fastRecovery }, { name: 'down-kms', endpoint: `http://127.0.0.1:${port}` });
    const res = await stack.call('POST', '/api/v1/cckm/aws/upload-key', { token, body: { ...example, kms: 'down-kms', aws_param: { Alias: 'down-1' } } });
    for (let i = 0; i < 100; i++) {
      const j = await stack.call('GET', `/api/v1/jobs/${res.body.id}`, { token });
      if (j.body.attempts >= 2) {
        expect(j.body.error).toMatchObject({ code: 'aws_unreachable', retryable: true });
        break;
      }
      await new Promise((r) => setTimeout(r, 50));
    }
    const late = new KmsEmulator({ port, accounts: { [EMULATOR_ACCESS_KEY]: '123456789012' } });
    await late.start();
    cleanups.push(() => late.close());
    const job = await waitForJob(stack, token, res.body.id);
    expect(job.status).toBe('succeeded');
    expect(late.keys().filter((k) => k.tags.some((t) => t.TagValue === res.body.id))).toHaveLength(1);
  }, 60_000);
});
