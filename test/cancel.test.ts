import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cancelQueuedJob } from '../api/cancel.js';
import { createStores } from '../shared/context.js';
import { Notifier } from '../shared/notifier.js';
import { createUploadQueue } from '../shared/queues.js';
import { createRedis } from '../shared/redis.js';
import { seedKms, seedLocalKey, startStack, waitForBatch, waitForJob, type TestStack } from './helpers/stack.js';

const example = JSON.parse(readFileSync(new URL('./fixtures/spec-example-request.json', import.meta.url), 'utf8')) as Record<string, unknown>;

let stack: TestStack;
let token: string;

beforeAll(async () => {
  stack = await startStack({ name: 'cancel', worker: false });
  token = await stack.token('acme');
  await seedKms(stack, token);
  await seedLocalKey(stack, token, 'test-key');
});
afterAll(async () => {
  await stack?.close();
});

const keysTagged = (id: string) => stack.emulator.keys().filter((k) => k.tags.some((t) => t.TagValue === id));

describe('canceling a job that retry-failed set back after its key was made', () => {
  it('when an earlier run made and imported the key, then neither the job nor its batch cancels it, and it runs to its end with that key', async () => {
    // The first run imports the material, then DescribeKey is refused: a permanent failure after the import,
    // which schedules no deletion (the key holds its material).
    stack.emulator.injectFault({ op: 'DescribeKey', error: 'AccessDeniedException', status: 400, count: 1000 });
    let worker = await stack.startWorker();
    const res = await stack.call('POST', '/api/v1/cckm/aws/upload-key/batch', { token, body: { items: [{ ...example, aws_param: { Alias: 'cancel-after-key' } }] } });
    expect(res.status).toBe(202);
    const batchId = res.body.id as string;
    expect((await waitForBatch(stack, token, batchId, 15_000)).counts).toMatchObject({ failed: 1 });
    await worker.close();
    stack.emulator.clearFaults();
    const jobId = (await stack.call('GET', `/api/v1/batches/${batchId}/jobs`, { token })).body.jobs[0].id as string;
    const failed = (await stack.call('GET', `/api/v1/jobs/${jobId}`, { token })).body;
    expect(failed).toMatchObject({ status: 'failed', error: { code: 'aws_access_denied' }, deletion_scheduled_for: null });
    expect(failed.kms_key_arn).toEqual(expect.any(String));

    // Set back to queued (attempts 0), with no worker running.
    expect((await stack.call('POST', `/api/v1/batches/${batchId}/retry-failed`, { token })).body.retried).toBe(1);
    expect((await stack.call('GET', `/api/v1/jobs/${jobId}`, { token })).body).toMatchObject({ status: 'queued', attempts: 0 });
    const del = await stack.call('DELETE', `/api/v1/jobs/${jobId}`, { token });
    expect(del.status).toBe(409);
    expect(del.body).toMatchObject({ code: 'job_started' });
    expect((await stack.call('DELETE', `/api/v1/batches/${batchId}`, { token })).body.canceled).toBe(0);
    expect((await stack.call('GET', `/api/v1/jobs/${jobId}`, { token })).body.status).toBe('queued');

    worker = await stack.startWorker();
    try {
      const done = await waitForJob(stack, token, jobId, 15_000);
      expect(done).toMatchObject({ status: 'succeeded', kms_key_arn: failed.kms_key_arn });
      expect(keysTagged(jobId).map((k) => k.keyState)).toEqual(['Enabled']);
    } finally {
      await worker.close();
    }
  });
});

describe('a cancel that finds the job no longer queued', () => {
  it('when the record moved on after the cancel read it (a worker started the job, which now waits for its retry), then its BullMQ job stays in the queue and the record is left as it is', async () => {
    // DELETE of a batch reads its queued jobs one chunk at a time: a job it read as queued can start, and
    // fail for a while, before its turn. Its record is then `retrying` and its BullMQ job waits for the retry.
    const res = await stack.call('POST', '/api/v1/cckm/aws/upload-key', { token, body: { ...example, aws_param: { Alias: 'cancel-stale-read' } } });
    expect(res.status).toBe(202);
    const jobId = res.body.id as string;
    const redis = createRedis(stack.config);
    const stores = createStores(stack.config, redis);
    const queue = createUploadQueue(redis, stores.keys);
    try {
      const readByCancel = await stores.jobs.get(jobId);
      expect(readByCancel?.status).toBe('queued');
      await stores.jobs.updateIf(jobId, undefined, (j) => {
        j.status = 'retrying';
        j.attempts = 1;
        j.step = 'resolve';
        j.error = { code: 'source_unavailable', message: 'the key source does not answer', retryable: true };
      });
      const notified: unknown[] = [];
      const outcome = await cancelQueuedJob({ stores, queue, notifier: new Notifier(stores, async (e) => void notified.push(e)) }, readByCancel as NonNullable<typeof readByCancel>);
      expect(outcome).toBe('started');
      expect(await queue.getJob(jobId)).toBeDefined();
      expect((await stores.jobs.get(jobId))?.status).toBe('retrying');
      expect(notified).toEqual([]);
    } finally {
      await queue.remove(jobId);
      await queue.close();
      redis.disconnect();
    }
  });
});
