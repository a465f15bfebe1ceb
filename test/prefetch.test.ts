import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import type { WorkerHandle } from '../worker/runner.js';
import { createUploadQueue, type UploadQueue } from '../shared/queues.js';
import { Keyspace } from '../shared/stores/keyspace.js';
import { seedKms, seedLocalKey, startStack, waitForBatch, waitForJob, type TestStack } from './helpers/stack.js';

const example = JSON.parse(readFileSync(new URL('./fixtures/spec-example-request.json', import.meta.url), 'utf8')) as Record<string, unknown>;

// One slot and one job held ahead of it (WORKER_PREFETCH=1), with KMS requests slow enough (150 ms each) that
// the first job is still running while the second waits for the slot.
const ONE_SLOT = { WORKER_CONCURRENCY: '1', WORKER_PREFETCH: '1' };

let stack: TestStack;
let token: string;
let queueRedis: Redis;
let queue: UploadQueue;

beforeAll(async () => {
  stack = await startStack({ name: 'prefetch', worker: false });
  token = await stack.token('acme');
  await seedKms(stack, token);
  await seedLocalKey(stack, token, 'test-key');
  queueRedis = new Redis(stack.config.REDIS_URL, { maxRetriesPerRequest: null });
  queue = createUploadQueue(queueRedis, new Keyspace(stack.config.KEYFERRY_PREFIX));
});
afterAll(async () => {
  await queue?.close();
  queueRedis?.disconnect();
  await stack?.close();
});

const upload = async (alias: string): Promise<string> => {
  const res = await stack.call('POST', '/api/v1/cckm/aws/upload-key', { token, body: { ...example, aws_param: { Alias: alias } } });
  expect(res.status).toBe(202);
  return res.body.id as string;
};
const statusOf = async (id: string) => (await stack.call('GET', `/api/v1/jobs/${id}`, { token })).body.status as string;
const keysTagged = (id: string) => stack.emulator.keys().filter((k) => k.tags.some((t) => t.TagValue === id));

/** Waits until job `first` runs and job `second` is held by the worker (BullMQ: active) without having started. */
async function untilHeldAhead(first: string, second: string): Promise<void> {
  await vi.waitFor(async () => expect(await statusOf(first)).toBe('running'), { timeout: 5000, interval: 10 });
  await vi.waitFor(async () => expect(await queue.getJobState(second)).toBe('active'), { timeout: 5000, interval: 10 });
}

describe('jobs held ahead of the worker’s slots (WORKER_PREFETCH)', () => {
  let worker: WorkerHandle | undefined;

  /** A one-slot worker, running upload `<name>-1` with upload `<name>-2` held ahead; `test` gets both ids. */
  async function withOneHeldAhead(name: string, test: (first: string, second: string) => Promise<void>): Promise<void> {
    worker = await stack.startWorker(ONE_SLOT);
    try {
      const first = await upload(`${name}-1`);
      const second = await upload(`${name}-2`);
      await untilHeldAhead(first, second);
      await test(first, second);
    } finally {
      await worker.close();
    }
  }
  beforeAll(() => stack.emulator.setLatency(150));
  afterAll(() => stack.emulator.setLatency(0));

  it('when the one slot is busy, then the job held ahead stays queued until the slot is free, and then runs', () =>
    withOneHeldAhead('prefetch-run', async (first, second) => {
      // Held by the worker, but not started: never running while the first one is. (The second's status is read
      // first: the first one, running before, was still running while it was read if it still is afterwards.)
      const seen = new Set<string>();
      for (;;) {
        const secondNow = await statusOf(second);
        if ((await statusOf(first)) !== 'running') break;
        seen.add(secondNow);
      }
      expect([...seen]).toEqual(['queued']);
      expect(await waitForJob(stack, token, second, 10_000)).toMatchObject({ status: 'succeeded', attempts: 1 });
      expect(await statusOf(first)).toBe('succeeded');
    }));

  it('when a job held ahead is canceled, then it is canceled, the worker does nothing with it, and the running job finishes', () =>
    withOneHeldAhead('prefetch-cancel', async (first, second) => {
      const del = await stack.call('DELETE', `/api/v1/jobs/${second}`, { token });
      expect(del.status).toBe(200);
      expect(del.body).toMatchObject({ id: second, status: 'canceled' });
      expect(await waitForJob(stack, token, first, 10_000)).toMatchObject({ status: 'succeeded' });
      // The worker got the slot for it, found it canceled, and let BullMQ complete it untouched.
      await vi.waitFor(async () => expect(await queue.getJobState(second)).toBe('completed'), { timeout: 5000 });
      expect(await stack.call('GET', `/api/v1/jobs/${second}`, { token })).toMatchObject({ body: { status: 'canceled', attempts: 0, kms_key_arn: null } });
      expect(keysTagged(second)).toEqual([]);
      expect(keysTagged(first)).toHaveLength(1);
    }));

  it('when a batch is canceled, then its job held ahead is canceled with the queued ones and the running one finishes', async () => {
    worker = await stack.startWorker(ONE_SLOT);
    try {
      const items = [1, 2, 3].map((i) => ({ ...example, aws_param: { Alias: `prefetch-batch-${i}` } }));
      const res = await stack.call('POST', '/api/v1/cckm/aws/upload-key/batch', { token, body: { items } });
      expect(res.status).toBe(202);
      const page = await stack.call('GET', `/api/v1/batches/${res.body.id}/jobs`, { token });
      const ids = (page.body.jobs as { id: string; batch_index: number }[]).sort((a, b) => a.batch_index - b.batch_index).map((j) => j.id);
      expect(ids).toHaveLength(3);
      const queueIds = async () => {
        const held = await queue.getJobs(['active']);
        return held.map((j) => j.data.jobId);
      };
      const runningIds = async () => (await Promise.all(ids.map(async (id) => ((await statusOf(id)) === 'running' ? id : undefined)))).filter(Boolean);
      // The first runs, one more is held ahead (BullMQ: active), the third waits in the queue.
      let running: (string | undefined)[] = [];
      await vi.waitFor(
        async () => {
          expect((await queueIds()).length).toBe(2);
          running = await runningIds();
          expect(running).toHaveLength(1);
        },
        { timeout: 5000, interval: 10 },
      );
      const del = await stack.call('DELETE', `/api/v1/batches/${res.body.id}`, { token });
      expect(del.status).toBe(200);
      expect(del.body.canceled).toBe(2);
      const done = await waitForBatch(stack, token, res.body.id, 10_000);
      expect(done.counts).toMatchObject({ succeeded: 1, canceled: 2, failed: 0 });
      const made = ids.filter((id) => keysTagged(id).length > 0);
      expect(made).toEqual(running);
    } finally {
      await worker.close();
    }
  });

  it('when the record of a job held ahead changes meanwhile to a status that is not final, then the job starts from the changed record and succeeds', () =>
    withOneHeldAhead('prefetch-changed', async (first, second) => {
      // As a run of it that had lost its lock would write it (its failure, late): not a cancel.
      const key = new Keyspace(stack.config.KEYFERRY_PREFIX).job(second);
      const stored = JSON.parse((await stack.redis.get(key)) as string) as Record<string, unknown>;
      await stack.redis.set(key, JSON.stringify({ ...stored, status: 'retrying', error: { code: 'aws_unavailable', message: 'late', retryable: true }, write_id: randomUUID() }));
      expect(await statusOf(first)).toBe('running'); // so the second had not started yet
      expect(await waitForJob(stack, token, second, 10_000)).toMatchObject({ status: 'succeeded', error: null });
      expect(keysTagged(second)).toHaveLength(1);
    }));

  it('when the worker shuts down, then the running job finishes and the job held ahead goes back to the queue unstarted', async () => {
    worker = await stack.startWorker(ONE_SLOT);
    const first = await upload('prefetch-close-1');
    const second = await upload('prefetch-close-2');
    try {
      await untilHeldAhead(first, second);
    } finally {
      await worker.close();
    }
    expect(await statusOf(first)).toBe('succeeded');
    expect(await queue.getJobState(second)).toBe('waiting');
    expect(await stack.call('GET', `/api/v1/jobs/${second}`, { token })).toMatchObject({ body: { status: 'queued', attempts: 0 } });
    expect(keysTagged(second)).toEqual([]);
    expect(stack.logs.lines.some((l) => l.includes(second) && l.includes('goes back to the queue unstarted'))).toBe(true);
    // Another worker takes it up as a first attempt.
    worker = await stack.startWorker(ONE_SLOT);
    try {
      expect(await waitForJob(stack, token, second, 10_000)).toMatchObject({ status: 'succeeded', attempts: 1 });
      expect(keysTagged(second)).toHaveLength(1);
    } finally {
      await worker.close();
    }
  });
});
