import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createStores } from '../shared/context.js';
import { createRedis } from '../shared/redis.js';
import { Keyspace } from '../shared/stores/keyspace.js';
import { collectEvents } from './helpers/sse.js';
import { queuedJobs, seedKms, seedLocalKey, startStack, waitForBatch, waitForJob, type TestStack } from './helpers/stack.js';

const example = JSON.parse(readFileSync(new URL('./fixtures/spec-example-request.json', import.meta.url), 'utf8')) as Record<string, unknown>;
const item = (i: number, extra: Record<string, unknown> = {}) => ({ source_key_identifier: 'test-key', region: 'ap-south-1', kms: 'kms', aws_param: { Alias: `batch-${i}` }, ...extra });

let stack: TestStack;
let token: string;
const postBatch = (body: unknown, headers: Record<string, string> = {}) => stack.call('POST', '/api/v1/cckm/aws/upload-key/batch', { token, body, headers });
const waitingJobs = () => queuedJobs(stack);


beforeAll(async () => {
  stack = await startStack({ name: 'batches', env: { SSE_KEEPALIVE_MS: '200' } });
  token = await stack.token('acme');
  await seedKms(stack, token);
  await seedLocalKey(stack, token, 'test-key');
});
afterAll(async () => {
  await stack?.close();
});

describe('batch validation', () => {
  it('when items are invalid, then one 400 names each item index and path, and nothing is enqueued', async () => {
    const before = await waitingJobs();
    const res = await postBatch({ items: [item(0), { ...item(1), region: 'Mumbai' }, item(2, { aws_param: { ValidTo: 'soon' } }), 'not-an-object'] });
    expect(res.status).toBe(400);
    expect(res.headers.get('content-type')).toMatch(/^application\/problem\+json/);
    expect(res.body.errors.map((e: { path: string }) => e.path)).toEqual(
      expect.arrayContaining(['items[1].region', 'items[2].aws_param.ValidTo', 'items[3]']),
    );
    expect(res.body.errors.some((e: { path: string }) => e.path.startsWith('items[0]'))).toBe(false);
    expect(await waitingJobs()).toBe(before);
  });

  it('when two items claim one alias in the same kms and region, then 400 names the second', async () => {
    const res = await postBatch({ items: [item(7), item(7), item(7, { region: 'us-east-1' })] });
    expect(res.status).toBe(400);
    expect(res.body.errors).toEqual([{ path: 'items[1].aws_param.Alias', message: expect.stringContaining('items[0]') }]);
  });

  it('when there are no items or more than 10,000, then 400', async () => {
    expect((await postBatch({ items: [] })).status).toBe(400);
    expect((await postBatch({ items: Array.from({ length: 10_001 }, () => ({})) })).body.errors[0].path).toBe('items');
  });

  it('when an item names an unknown kms, then 422 names the item', async () => {
    const res = await postBatch({ items: [item(0), item(1, { kms: 'nope' })] });
    expect(res.status).toBe(422);
    expect(res.body.errors).toEqual([{ path: 'items[1].kms', message: expect.any(String) }]);
  });
});

describe('batch runs', () => {
  let batchId: string;

  it('when a batch with one bad item runs, then the events stream shows progress to completion and the counts add up', async () => {
    const items = [item(10), item(11), { ...item(12), source_key_identifier: 'missing-key' }, item(13), item(14)];
    const res = await postBatch({ items });
    expect(res.status).toBe(202);
    batchId = res.body.id;
    expect(res.headers.get('location')).toBe(`/api/v1/batches/${batchId}`);
    expect(res.body).toMatchObject({ status: 'running', total: 5 });

    const events = await collectEvents(`${stack.api.url}/api/v1/batches/${batchId}/events`, token, { names: ['snapshot', 'progress', 'completed'], until: (e) => e.event === 'completed' });
    expect(events[0]?.event).toBe('snapshot');
    const last = events.at(-1);
    expect(last?.event).toBe('completed');
    expect(JSON.parse(last?.data ?? '{}')).toMatchObject({ status: 'completed', counts: { succeeded: 4, failed: 1, queued: 0, running: 0 } });
    const finals = events.filter((e) => e.event === 'progress').map((e) => JSON.parse(e.data) as { status: string }).filter((p) => ['succeeded', 'failed'].includes(p.status));
    // Every job not yet final in the snapshot reports its end as a progress event (the bad item may have
    // failed before the stream was opened: the snapshot then counts it as failed).
    const atSnapshot = (events[0] ? JSON.parse(events[0].data).counts : {}) as Record<string, number>;
    expect(finals.length).toBeGreaterThanOrEqual(5 - ((atSnapshot.succeeded ?? 0) + (atSnapshot.failed ?? 0) + (atSnapshot.canceled ?? 0)));

    const batch = await stack.call('GET', `/api/v1/batches/${batchId}`, { token });
    expect(batch.body).toMatchObject({ status: 'completed', total: 5, counts: { succeeded: 4, failed: 1, canceled: 0 }, finished_at: expect.any(String) });
    // Retention: a completed batch's keys and its finished jobs' records now expire (30 days by default).
    const keys = new Keyspace(stack.config.KEYFERRY_PREFIX);
    for (const key of [keys.batch(batchId), keys.batchCounts(batchId), keys.job(`${batchId}.0`)]) {
      expect(await stack.redis.ttl(key), key).toBeGreaterThan(29 * 86_400);
    }
    // Event streams serve live watchers and go an hour after the end.
    for (const key of [keys.batchEvents(batchId), keys.jobEvents(`${batchId}.0`)]) {
      expect(await stack.redis.ttl(key), key).toBeGreaterThan(3500);
      expect(await stack.redis.ttl(key), key).toBeLessThanOrEqual(3600);
    }
  });

  it('when the jobs are paged, then the failed filter and the cursor work', async () => {
    const failed = await stack.call('GET', `/api/v1/batches/${batchId}/jobs?status=failed`, { token });
    expect(failed.body.jobs).toHaveLength(1);
    expect(failed.body.jobs[0]).toMatchObject({ batch_id: batchId, batch_index: 2, status: 'failed', error: { code: 'source_key_not_found' } });
    expect(failed.body.next_cursor).toBeNull();
    // The worker's log lines of a batch item name the job, its batch and its account.
    const failLine = stack.logs.lines.map((l) => JSON.parse(l) as Record<string, unknown>).find((l) => l.job_id === `${batchId}.2` && l.code === 'source_key_not_found');
    expect(failLine).toMatchObject({ batch_id: batchId, account: expect.any(String), step: 'resolve' });
    const successLine = stack.logs.lines.map((l) => JSON.parse(l) as Record<string, unknown>).find((l) => l.job_id === `${batchId}.0` && l.msg === 'upload succeeded');
    expect(successLine).toMatchObject({ batch_id: batchId, account: failLine?.account, kms_key_arn: expect.stringMatching(/^arn:aws:kms:/), attempts: 1 });

    const p1 = await stack.call('GET', `/api/v1/batches/${batchId}/jobs?limit=2`, { token });
    expect(p1.body.jobs.map((j: { batch_index: number }) => j.batch_index)).toEqual([0, 1]);
    const p2 = await stack.call('GET', `/api/v1/batches/${batchId}/jobs?limit=2&cursor=${p1.body.next_cursor}`, { token });
    expect(p2.body.jobs.map((j: { batch_index: number }) => j.batch_index)).toEqual([2, 3]);
    const p3 = await stack.call('GET', `/api/v1/batches/${batchId}/jobs?limit=2&cursor=${p2.body.next_cursor}`, { token });
    expect(p3.body.jobs.map((j: { batch_index: number }) => j.batch_index)).toEqual([4]);
    expect(p3.body.next_cursor).toBeNull();
    expect((await stack.call('GET', `/api/v1/batches/${batchId}/jobs?status=bogus`, { token })).status).toBe(400);
  });

  it('when the missing key exists and retry-failed is called twice at once, then the failed job is retried once and succeeds', async () => {
    await seedLocalKey(stack, token, 'missing-key');
    const [a, b] = await Promise.all([1, 2].map(() => stack.call('POST', `/api/v1/batches/${batchId}/retry-failed`, { token })));
    expect([a?.status, b?.status]).toEqual([202, 202]);
    expect((a?.body.retried ?? 0) + (b?.body.retried ?? 0)).toBe(1);
    const done = await waitForBatch(stack, token, batchId);
    expect(done.counts).toMatchObject({ succeeded: 5, failed: 0 });
    expect(await stack.redis.ttl(new Keyspace(stack.config.KEYFERRY_PREFIX).batch(batchId))).toBeGreaterThan(29 * 86_400);
  });

  it("when retry-failed finds no failed job it can move (their records expired before the batch's), then the batch stays completed", async () => {
    const res = await postBatch({ items: [{ ...item(30), source_key_identifier: 'missing-key-2' }] });
    const done = await waitForBatch(stack, token, res.body.id);
    expect(done).toMatchObject({ status: 'completed', counts: { failed: 1 } });
    // A job's record expires 30 days after the job ended, the batch's keys 30 days after the batch did.
    await stack.redis.del(new Keyspace(stack.config.KEYFERRY_PREFIX).job(`${res.body.id}.0`));
    const retried = await stack.call('POST', `/api/v1/batches/${res.body.id}/retry-failed`, { token });
    expect(retried.status).toBe(202);
    expect(retried.body).toMatchObject({ retried: 0, status: 'completed', finished_at: done.finished_at });
    expect((await stack.call('GET', `/api/v1/batches/${res.body.id}`, { token })).body).toMatchObject({ status: 'completed', finished_at: done.finished_at });
  });

  it('when a job of a completed batch leaves its final status (retry-failed), then that write reopens the batch; a cancel that ends it again completes it again', async () => {
    const res = await postBatch({ items: [{ ...item(31), source_key_identifier: 'missing-key-3' }] });
    const batchKeys = new Keyspace(stack.config.KEYFERRY_PREFIX);
    expect(await waitForBatch(stack, token, res.body.id)).toMatchObject({ status: 'completed', counts: { failed: 1 } });
    expect(await stack.redis.ttl(batchKeys.batch(res.body.id))).toBeGreaterThan(0);
    const redis = createRedis(stack.config);
    try {
      // retry-failed's move, done by hand so that nothing runs between it and the cancel below.
      const moved = await createStores(stack.config, redis).jobs.updateIf(`${res.body.id}.0`, 'failed', (j) => {
        j.status = 'queued';
        j.error = null;
        j.finished_at = null;
        j.attempts = 0;
      });
      expect(moved?.batchCompletion).toBe(0);
    } finally {
      redis.disconnect();
    }
    expect((await stack.call('GET', `/api/v1/batches/${res.body.id}`, { token })).body).toMatchObject({ status: 'running', finished_at: null, counts: { queued: 1, failed: 0 } });
    for (const key of [batchKeys.batch(res.body.id), batchKeys.batchCounts(res.body.id), batchKeys.batchEvents(res.body.id)]) {
      expect(await stack.redis.ttl(key), key).toBe(-1);
    }
    // A cancel of the moved job before retry-failed enqueued it ends the batch again.
    expect((await stack.call('DELETE', `/api/v1/jobs/${res.body.id}.0`, { token })).body.status).toBe('canceled');
    expect((await stack.call('GET', `/api/v1/batches/${res.body.id}`, { token })).body).toMatchObject({ status: 'completed', finished_at: expect.any(String), counts: { canceled: 1 } });
  });

  it('when another account asks for the batch, then 404', async () => {
    const other = await stack.token('globex');
    expect((await stack.call('GET', `/api/v1/batches/${batchId}`, { token: other })).status).toBe(404);
    expect((await stack.call('GET', `/api/v1/batches/${batchId}/jobs`, { token: other })).status).toBe(404);
  });

  it("when a job id names another of the batch's Redis keys (`<batch id>.batch`, `<job id>.events`), then every job route answers 404, not 500", async () => {
    // The batch hash is at the key a job `<batch id>.batch` would have, and a single upload's event stream at
    // `<job id>.events`: reading either as a job record is a WRONGTYPE error in Redis.
    const single = await stack.call('POST', '/api/v1/cckm/aws/upload-key', { token, body: item(40) });
    const singleId = single.body.id as string;
    expect(await waitForJob(stack, token, singleId)).toMatchObject({ status: 'succeeded' });
    expect(await stack.redis.type(new Keyspace(stack.config.KEYFERRY_PREFIX).jobEvents(singleId))).toBe('stream');
    for (const id of [`${batchId}.batch`, `${singleId}.events`, `${batchId}.batch:counts`, `${batchId}.0}`]) {
      for (const [method, path] of [['GET', ''], ['DELETE', ''], ['GET', '/events'], ['GET', '/deliveries']] as const) {
        const res = await stack.call(method, `/api/v1/jobs/${encodeURIComponent(id)}${path}`, { token });
        expect({ id, method, path, status: res.status, type: res.headers.get('content-type') }).toEqual({ id, method, path, status: 404, type: expect.stringMatching(/^application\/problem\+json/) });
      }
    }
    for (const path of ['', '/jobs', '/deliveries']) {
      expect((await stack.call('GET', `/api/v1/batches/${encodeURIComponent(`${batchId}}`)}${path}`, { token })).status).toBe(404);
    }
  });

  it('when the same Idempotency-Key and body are posted twice, then the same batch answers', async () => {
    const body = { items: [item(20), item(21)] };
    const a = await postBatch(body, { 'idempotency-key': 'batch-idem' });
    const b = await postBatch(body, { 'idempotency-key': 'batch-idem' });
    expect(b.body.id).toBe(a.body.id);
    expect((await postBatch({ items: [item(22)] }, { 'idempotency-key': 'batch-idem' })).status).toBe(422);
    await waitForBatch(stack, token, a.body.id);
  });

  it('when a single upload is submitted while a big batch runs, then it finishes while batch jobs still wait', async () => {
    stack.emulator.setLatency(10);
    try {
      const big = await postBatch({ items: Array.from({ length: 200 }, (_, i) => item(1000 + i)) });
      expect(big.status).toBe(202);
      // Let the batch fill the worker first.
      for (let i = 0; i < 100; i++) {
        const b = await stack.call('GET', `/api/v1/batches/${big.body.id}`, { token });
        if (b.body.counts.running > 0) break;
        await new Promise((r) => setTimeout(r, 20));
      }
      const single = await stack.call('POST', '/api/v1/cckm/aws/upload-key', { token, body: { ...example, aws_param: { Alias: 'interactive-1' } } });
      const job = await waitForJob(stack, token, single.body.id, 30_000);
      expect(job.status).toBe('succeeded');
      const batch = await stack.call('GET', `/api/v1/batches/${big.body.id}`, { token });
      expect(batch.body.counts.queued).toBeGreaterThan(50);
      await stack.call('DELETE', `/api/v1/batches/${big.body.id}`, { token });
    } finally {
      stack.emulator.setLatency(0);
    }
  });
});

describe('job events', () => {
  it('when a job is watched, then its status and step changes stream until it succeeds, and Last-Event-ID resumes', async () => {
    // Every KMS request takes a while, so that the watcher is connected before the job is past create_key.
    stack.emulator.setLatency(150);
    let all: Awaited<ReturnType<typeof collectUntilFinal>>;
    let res: Awaited<ReturnType<typeof stack.call>>;
    try {
      res = await stack.call('POST', '/api/v1/cckm/aws/upload-key', { token, body: { ...example, aws_param: { Alias: 'watched-1' } } });
      all = await collectUntilFinal(res.body.id);
    } finally {
      stack.emulator.setLatency(0);
    }
    const statuses = all.map((e) => JSON.parse(e.data).status as string);
    expect(statuses.at(-1)).toBe('succeeded');
    const steps = all.map((e) => JSON.parse(e.data).step as string);
    expect(steps).toEqual(expect.arrayContaining(['create_key', 'import', 'record']));
    const ids = all.map((e) => e.id);
    // Resuming after the third event replays only what came after it.
    const resumed = await collectUntilFinal(res.body.id, ids[2]);
    expect(resumed.map((e) => e.id)).toEqual(ids.slice(3));
    // Resuming after the last event (as EventSource does when the server closes) gets the final state and ends.
    const after = await collectUntilFinal(res.body.id, ids.at(-1));
    expect(after.map((e) => JSON.parse(e.data).status)).toEqual(['succeeded']);
  });
});

/** The job's events until one with a final status (the server then closes the stream). */
const collectUntilFinal = (jobId: string, lastEventId?: string) =>
  collectEvents(`${stack.api.url}/api/v1/jobs/${jobId}/events`, token, {
    names: ['job'],
    until: (e) => ['succeeded', 'failed', 'canceled'].includes(JSON.parse(e.data).status),
    ...(lastEventId ? { lastEventId } : {}),
  });
