import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { connect } from 'node:net';
import { Queue, Worker } from 'bullmq';
import { Redis } from 'ioredis';
import { SignJWT } from 'jose';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { Claim, Idempotency } from '../api/idempotency.js';
import { Intake, undoBatch, undoSubmission } from '../api/intake.js';
import { startApi } from '../api/server.js';
import { createStores } from '../shared/context.js';
import { sha256Hex } from '../shared/crypto.js';
import { newJobRecord, UPLOAD_QUEUE, type UploadJobData } from '../shared/jobs.js';
import { createLogger } from '../shared/logger.js';
import { createUploadQueue, type UploadQueue } from '../shared/queues.js';
import { createRedis } from '../shared/redis.js';
import { parseUploadKey } from '../shared/schemas/upload-key.js';
import { deleteKeyspace, Keyspace } from '../shared/stores/keyspace.js';
import { isRateLimitBucket, keysUnder, monitorCommands, redisValuesUnder, valuesOf } from './helpers/redis-dump.js';
import { socketWrites } from './helpers/socket-writes.js';
import { EMULATOR_SECRET_KEY, queuedJobs, seedKms, seedLocalKey, startStack, type TestStack } from './helpers/stack.js';

const example = JSON.parse(readFileSync(new URL('./fixtures/spec-example-request.json', import.meta.url), 'utf8')) as Record<string, unknown>;

// No worker here: jobs stay queued, so intake behaviour (and cancel) is observed alone.
let stack: TestStack;
let token: string;
const upload = (body: unknown, headers: Record<string, string> = {}, t = token) =>
  stack.call('POST', '/api/v1/cckm/aws/upload-key', { token: t, body, headers });
const keyCount = async () => {
  const keys = await keysUnder(stack.redis, stack.config.KEYFERRY_PREFIX);
  return (await valuesOf(stack.redis, keys.filter((k) => !isRateLimitBucket(k)))).length;
};

beforeAll(async () => {
  stack = await startStack({ name: 'intake', worker: false });
  token = await stack.token('acme');
  await seedKms(stack, token);
  await seedLocalKey(stack, token, 'test-key');
});
afterAll(async () => {
  await stack?.close();
});

/** Jobs waiting in BullMQ's list for this test file's queue. */
const queueSize = () => queuedJobs(stack);

describe('intake: validation', () => {
  it('when the body breaks several rules, then one 400 problem+json lists every path and Redis is untouched', async () => {
    const before = await keyCount();
    const res = await upload({ region: 'nowhere', kms: 'kms', extra: true, KeyExpiration: true, aws_param: { Tags: [{ TagKey: 'k', TagValue: 'bad value!' }] } });
    expect(res.status).toBe(400);
    expect(res.headers.get('content-type')).toMatch(/^application\/problem\+json/);
    expect(res.body).toMatchObject({ status: 400, code: 'validation_failed', type: expect.any(String), title: expect.any(String) });
    expect(res.body.errors.map((e: { path: string }) => e.path)).toEqual(
      expect.arrayContaining(['source_key_identifier', 'region', 'extra', 'aws_param.Tags[0].TagValue', 'aws_param.ValidTo']),
    );
    expect(await keyCount()).toBe(before);
  });

  it('when the JSON is malformed, then 400 problem, not 500', async () => {
    const res = await stack.call('POST', '/api/v1/cckm/aws/upload-key', { token, raw: '{"region": ', headers: { 'content-type': 'application/json' } });
    expect(res.status).toBe(400);
    expect(res.body.code).toBe('malformed_json');
  });

  it('when the content type is not JSON, then 415 problem', async () => {
    const res = await stack.call('POST', '/api/v1/cckm/aws/upload-key', { token, raw: 'region=x', headers: { 'content-type': 'application/x-www-form-urlencoded' } });
    expect(res.status).toBe(415);
    expect(res.headers.get('content-type')).toMatch(/^application\/problem\+json/);
  });

  it('when a POST that needs no body comes with no body and no Content-Length (as `curl -X POST` sends it), then it is served, not 415', async () => {
    const { hostname: host, port } = new URL(stack.api.url);
    const answer = await new Promise<string>((resolve, reject) => {
      const socket = connect(Number(port), host, () => {
        socket.write(`POST /api/v1/webhooks/secret HTTP/1.1\r\nHost: ${host}:${port}\r\nAuthorization: Bearer ${token}\r\nConnection: close\r\n\r\n`);
      });
      let text = '';
      socket.setEncoding('utf8').on('data', (d: string) => (text += d)).on('end', () => resolve(text)).on('error', reject);
    });
    expect(answer).toMatch(/^HTTP\/1\.1 201 /);
    expect(answer).toMatch(/"secret":"whsec_/);
  });

  it('when the KMS connection does not exist or does not serve the region, then 422 names the field', async () => {
    const noKms = await upload({ ...example, kms: 'nope' });
    expect(noKms.status).toBe(422);
    expect(noKms.body.errors).toEqual([{ path: 'kms', message: expect.stringContaining('nope') }]);
    const badRegion = await upload({ ...example, region: 'eu-north-1' });
    expect(badRegion.status).toBe(422);
    expect(badRegion.body.errors[0].path).toBe('region');
    const noTemplate = await upload({ ...example, policytemplate: 'missing-template' });
    expect(noTemplate.status).toBe(422);
    expect(noTemplate.body.errors[0].path).toBe('policytemplate');
  });

  it('when a route does not exist, then 404 problem', async () => {
    const res = await stack.call('GET', '/api/v1/nothing-here', { token });
    expect(res.status).toBe(404);
    expect(res.headers.get('content-type')).toMatch(/^application\/problem\+json/);
  });
});

describe('intake: accepted jobs', () => {
  it('when the request is valid, then the job record exists and one BullMQ job waits', async () => {
    const before = await queueSize();
    const res = await upload(example);
    expect(res.status).toBe(202);
    expect(res.body.status).toBe('queued');
    expect(await queueSize()).toBe(before + 1);
    const polled = await stack.call('GET', `/api/v1/jobs/${res.body.id}`, { token });
    expect(polled.body).toEqual(res.body);
  });

  it('when the same Idempotency-Key and body are sent again, then the same job answers and nothing is enqueued twice', async () => {
    const before = await queueSize();
    const a = await upload(example, { 'idempotency-key': 'idem-1' });
    const b = await upload({ ...example }, { 'idempotency-key': 'idem-1' });
    expect(a.status).toBe(202);
    expect(b.status).toBe(202);
    expect(b.body.id).toBe(a.body.id);
    expect(await queueSize()).toBe(before + 1);
  });

  it('when the same Idempotency-Key comes with another body, then 422', async () => {
    await upload(example, { 'idempotency-key': 'idem-2' });
    const res = await upload({ ...example, region: 'us-east-1' }, { 'idempotency-key': 'idem-2' });
    expect(res.status).toBe(422);
    expect(res.body.code).toBe('idempotency_key_reused');
  });

  it('when another account uses the same Idempotency-Key, then it gets its own job', async () => {
    const other = await stack.token('globex');
    await seedKms(stack, other);
    const a = await upload(example, { 'idempotency-key': 'shared-key' });
    const b = await upload(example, { 'idempotency-key': 'shared-key' }, other);
    expect(b.status).toBe(202);
    expect(b.body.id).not.toBe(a.body.id);
  });

  it('when a queued job is canceled, then it is canceled and leaves the queue; a second cancel is harmless', async () => {
    const res = await upload(example);
    const before = await queueSize();
    const del = await stack.call('DELETE', `/api/v1/jobs/${res.body.id}`, { token });
    expect(del.status).toBe(200);
    expect(del.body.status).toBe('canceled');
    expect(del.body.finished_at).toEqual(expect.any(String));
    expect(await queueSize()).toBe(before - 1);
    const again = await stack.call('DELETE', `/api/v1/jobs/${res.body.id}`, { token });
    expect(again.body.status).toBe('canceled');
  });
});

describe('intake: an enqueue that fails', () => {
  it('when BullMQ refuses the add after the record was written, then a problem answers, nothing of the job stays in Redis, and the Idempotency-Key can be used again', async () => {
    // BullMQ's add script reads the queue's meta hash: a string in its place makes Redis refuse the script.
    const meta = `${new Keyspace(stack.config.KEYFERRY_PREFIX).bullPrefix}:${UPLOAD_QUEUE}:meta`;
    const saved = await stack.redis.hgetall(meta);
    const before = await keysUnder(stack.redis, stack.config.KEYFERRY_PREFIX);
    const queuedBefore = await queueSize();
    await stack.redis.del(meta);
    await stack.redis.set(meta, 'not a hash');
    let refused: Awaited<ReturnType<typeof upload>>;
    try {
      refused = await upload(example, { 'idempotency-key': 'idem-refused' });
    } finally {
      await stack.redis.del(meta);
      if (Object.keys(saved).length > 0) await stack.redis.hset(meta, saved);
    }
    expect(refused.status).toBe(500);
    expect(refused.body.code).toBe('internal_error');
    expect(refused.headers.get('content-type')).toMatch(/^application\/problem\+json/);
    expect((await keysUnder(stack.redis, stack.config.KEYFERRY_PREFIX)).filter((k) => !before.includes(k) && !isRateLimitBucket(k))).toEqual([]);
    expect(await queueSize()).toBe(queuedBefore);

    const retried = await upload(example, { 'idempotency-key': 'idem-refused' });
    expect(retried.status).toBe(202);
    expect(await queueSize()).toBe(queuedBefore + 1);
  });

  it("when BullMQ refuses a batch's addBulk, then a problem answers and nothing of the batch stays, with an Idempotency-Key or without; a retry with the key makes a new batch", async () => {
    // A batch's jobs are added with a priority: BullMQ's script stores each job, then INCRs the queue's priority
    // counter, which Redis refuses on a value that is not a number; the stored job hashes stay behind.
    const counter = `${new Keyspace(stack.config.KEYFERRY_PREFIX).bullPrefix}:${UPLOAD_QUEUE}:pc`;
    const saved = await stack.redis.get(counter);
    const before = await keysUnder(stack.redis, stack.config.KEYFERRY_PREFIX);
    const queuedBefore = await queueSize();
    const items = (from: number) => [0, 1, 2].map((i) => ({ source_key_identifier: 'test-key', region: 'ap-south-1', kms: 'kms', aws_param: { Alias: `undo-batch-${from + i}` } }));
    const postBatch = (body: unknown, headers: Record<string, string> = {}) => stack.call('POST', '/api/v1/cckm/aws/upload-key/batch', { token, body, headers });
    await stack.redis.set(counter, 'not a number');
    let refused: Awaited<ReturnType<typeof upload>>[];
    try {
      refused = [await postBatch({ items: items(0) }), await postBatch({ items: items(10) }, { 'idempotency-key': 'idem-batch-refused' })];
    } finally {
      if (saved === null) await stack.redis.del(counter);
      else await stack.redis.set(counter, saved);
    }
    for (const res of refused) {
      expect(res.status).toBe(500);
      expect(res.body.code).toBe('internal_error');
    }
    expect((await keysUnder(stack.redis, stack.config.KEYFERRY_PREFIX)).filter((k) => !before.includes(k) && !isRateLimitBucket(k))).toEqual([]);
    expect(await queueSize()).toBe(queuedBefore);

    const retried = await postBatch({ items: items(10) }, { 'idempotency-key': 'idem-batch-refused' });
    expect(retried.status).toBe(202);
    expect(await queuedJobs(stack)).toBeGreaterThanOrEqual(3);
    expect(await stack.redis.zrange(`${new Keyspace(stack.config.KEYFERRY_PREFIX).bullPrefix}:${UPLOAD_QUEUE}:prioritized`, 0, -1)).toEqual(
      expect.arrayContaining([0, 1, 2].map((i) => `${retried.body.id}.${i}`)),
    );
  });
});

describe('intake: the record and the enqueue go out together', () => {
  it('when an upload is accepted, then its record is written before BullMQ adds the job, on the same connection', async () => {
    // A worker must never take a job whose record does not exist yet: the record's SET is sent first, and Redis
    // runs one connection's commands in the order sent.
    const keys = new Keyspace(stack.config.KEYFERRY_PREFIX);
    const seen: { args: string[]; client: string }[] = [];
    const stop = await monitorCommands(stack.config.REDIS_URL, (args, client) => seen.push({ args, client }));
    let id = '';
    const at = { recordSet: -1, add: -1, firstOnJobHash: -1 };
    try {
      const res = await upload(example);
      expect(res.status).toBe(202);
      id = String(res.body.id);
      const jobHash = `${keys.bullPrefix}:${UPLOAD_QUEUE}:${id}`;
      await vi.waitFor(() => {
        at.recordSet = seen.findIndex((c) => c.args[0]?.toLowerCase() === 'set' && c.args[1] === keys.job(id));
        at.add = seen.findIndex((c) => /^eval(sha)?$/i.test(c.args[0] ?? '') && c.args.some((a) => a.includes(id)));
        at.firstOnJobHash = seen.findIndex((c) => c.client === 'lua' && c.args[1] === jobHash);
        if (Object.values(at).some((i) => i < 0)) throw new Error(`not all seen yet: ${JSON.stringify(at)}`);
      }, { timeout: 5000 });
    } finally {
      stop();
    }
    expect(at.add).toBeGreaterThan(at.recordSet);
    expect(at.firstOnJobHash).toBeGreaterThan(at.recordSet);
    expect(seen[at.add]?.client).toBe(seen[at.recordSet]?.client);
  });

  it('when an upload is accepted on one Redis, then its record and its add leave in one socket write, after the lookups', async () => {
    // The intake as the API builds it: stores and queue on one coalescing client.
    const client = createRedis(stack.config, { failFast: true }) as Redis;
    const stores = createStores(stack.config, client);
    const queue = createUploadQueue(client, stores.keys);
    const intake = new Intake(stack.config, client, stores, queue);
    try {
      await intake.submitUpload('acme', example, undefined); // connects, defines the scripts
      let id = '';
      const writes = await socketWrites([client], async () => {
        id = (await intake.submitUpload('acme', example, undefined)).job.id;
      });
      // The KMS-connection lookup, then the record and the add together (sent one after the other, three writes).
      expect(writes).toBe(2);
      expect(await stores.jobs.get(id)).toMatchObject({ status: 'queued' });
      expect(await queue.getJobState(id)).toBe('waiting');
    } finally {
      await queue.close();
      client.disconnect();
    }
  });

  it("when Redis refuses the record's write, then a problem answers and the BullMQ job sent with it is removed", async () => {
    // An API whose Redis user may only read job records, and write everything else an upload writes.
    const prefix = stack.config.KEYFERRY_PREFIX;
    const keys = new Keyspace(prefix);
    const user = `${prefix}-records-read-only`;
    const password = randomUUID();
    const url = new URL(stack.config.REDIS_URL);
    url.username = user;
    url.password = password;
    const before = await keysUnder(stack.redis, prefix);
    const queuedBefore = await queueSize();
    const events = `${keys.bullPrefix}:${UPLOAD_QUEUE}:events`;
    const [lastEvent] = await stack.redis.xrevrange(events, '+', '-', 'COUNT', 1);
    let refused: Response;
    try {
      await stack.redis.call('ACL', 'SETUSER', user, 'reset', 'on', `>${password}`, `~${keys.bullPrefix}:*`, `~${prefix}:acct:*`, `%R~${prefix}:*`, 'resetchannels', '&*', '+@all', '-@admin', '-flushall', '-flushdb');
      const api = await startApi({ ...stack.config, REDIS_URL: url.toString() }, createLogger('silent'));
      try {
        refused = await fetch(`${api.url}/api/v1/cckm/aws/upload-key`, {
          method: 'POST',
          headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json', 'idempotency-key': 'idem-record-refused' },
          body: JSON.stringify(example),
        });
      } finally {
        await api.close();
      }
    } finally {
      await stack.redis.call('ACL', 'DELUSER', user);
    }
    const body = (await refused.json()) as { code: string };
    expect(refused.status).toBe(500);
    expect(body.code).toBe('internal_error');
    expect((await keysUnder(stack.redis, prefix)).filter((k) => !before.includes(k) && !isRateLimitBucket(k))).toEqual([]);
    expect(await queueSize()).toBe(queuedBefore);
    // The add did go out with the refused record, and was taken back: BullMQ's event stream shows it added, then removed.
    const since = await stack.redis.xrange(events, lastEvent ? `(${lastEvent[0]}` : '-', '+');
    const seen = since.map(([, fields]) => ({ event: fields[fields.indexOf('event') + 1], jobId: fields[fields.indexOf('jobId') + 1] }));
    const added = seen.find((e) => e.event === 'added');
    expect(added?.jobId).toBeDefined();
    expect(seen).toContainEqual({ event: 'removed', jobId: added?.jobId });

    const retried = await upload(example, { 'idempotency-key': 'idem-record-refused' });
    expect(retried.status).toBe(202);
  });
});

describe('intake: undoing a submission whose answer was lost', () => {
  // A keyspace of its own: no other test's queued job is there for the workers below to take.
  const config = () => ({ ...stack.config, KEYFERRY_PREFIX: `${stack.config.KEYFERRY_PREFIX}-undo` });
  const record = (batch?: { id: string; index: number }) =>
    newJobRecord({ id: batch ? `${batch.id}.${batch.index}` : randomUUID(), account: 'acme', request: parseUploadKey(example), kmsId: 'kms', maxAttempts: 1, batch });
  /** A worker that holds every job it takes until `letGo`. */
  const holdingWorker = (bullPrefix: string) => {
    let letGo = () => undefined as void;
    const held = new Promise<void>((resolve) => (letGo = resolve));
    const taken: string[] = [];
    const connection = new Redis(stack.config.REDIS_URL, { maxRetriesPerRequest: null }); // BullMQ does not close it
    const worker = new Worker(
      UPLOAD_QUEUE,
      async (job) => {
        taken.push(String(job.id));
        await held;
      },
      { connection, prefix: bullPrefix, autorun: false, concurrency: 2 },
    );
    return {
      taken,
      run: () => void worker.run(),
      close: async () => {
        letGo();
        await worker.close();
        connection.disconnect();
      },
    };
  };

  it('when a worker already holds the job and its record exists, then both stay with the claim; when the job only waits, all of it goes', async () => {
    const { jobs, keys } = createStores(config(), stack.redis);
    const queue = createUploadQueue(stack.redis, keys);
    const idempotency = new Idempotency(stack.redis, keys);
    const claimFor = async (id: string) => {
      const key = `undo-${randomUUID()}`;
      const { claim } = await idempotency.claim('acme', key, { id }, id, async () => undefined);
      return { claim, stored: async () => stack.redis.get(keys.idempotency('acme', sha256Hex(key))) };
    };
    /** The queue as the intake hands it to the undo: `enqueue` adds the job again. */
    const undoQueue = (id: string) => ({
      remove: (jobId: string) => queue.remove(jobId),
      enqueue: async () => void (await queue.add('upload-key', { jobId: id, account: 'acme' }, { jobId: id })),
    });
    const worker = holdingWorker(keys.bullPrefix);
    try {
      const running = record();
      const runningClaim = await claimFor(running.id);
      await jobs.create(running);
      await queue.add('upload-key', { jobId: running.id, account: 'acme' }, { jobId: running.id });
      worker.run();
      await vi.waitFor(() => expect(worker.taken).toEqual([running.id]), { timeout: 5000 });
      await undoSubmission(undoQueue(running.id), jobs, running.id, runningClaim.claim);
      expect(await jobs.get(running.id)).toMatchObject({ status: 'queued' });
      expect(await queue.getJobState(running.id)).toBe('active');
      const kept = JSON.parse((await runningClaim.stored()) as string) as { id: string; state?: string };
      expect(kept.id).toBe(running.id);
      expect(kept.state).toBeUndefined(); // undoing, then answering replays again

      // Held by a worker but without a record (the record's write was what failed): nothing was accepted.
      const unrecorded = record();
      const unrecordedClaim = await claimFor(unrecorded.id);
      await queue.add('upload-key', { jobId: unrecorded.id, account: 'acme' }, { jobId: unrecorded.id });
      await vi.waitFor(() => expect(worker.taken).toContain(unrecorded.id), { timeout: 5000 });
      await undoSubmission(undoQueue(unrecorded.id), jobs, unrecorded.id, unrecordedClaim.claim);
      expect(await unrecordedClaim.stored()).toBeNull();
      await worker.close();

      // Started already and put back for its retry (its record retrying, its job in BullMQ's delayed set, which
      // remove takes): accepted too, and its job is queued again, not lost.
      const retrying = record();
      const retryingClaim = await claimFor(retrying.id);
      await jobs.create({ ...retrying, status: 'retrying', attempts: 1 });
      await queue.add('upload-key', { jobId: retrying.id, account: 'acme' }, { jobId: retrying.id, delay: 60_000 });
      expect(await queue.getJobState(retrying.id)).toBe('delayed');
      await undoSubmission(undoQueue(retrying.id), jobs, retrying.id, retryingClaim.claim);
      expect(await jobs.get(retrying.id)).toMatchObject({ status: 'retrying' });
      expect(await queue.getJobState(retrying.id)).toBe('waiting');
      expect(JSON.parse((await retryingClaim.stored()) as string)).toMatchObject({ id: retrying.id });
      expect((JSON.parse((await retryingClaim.stored()) as string) as { state?: string }).state).toBeUndefined();

      const waiting = record();
      const waitingClaim = await claimFor(waiting.id);
      await jobs.create(waiting);
      await queue.add('upload-key', { jobId: waiting.id, account: 'acme' }, { jobId: waiting.id });
      await undoSubmission(undoQueue(waiting.id), jobs, waiting.id, waitingClaim.claim);
      expect(await jobs.get(waiting.id)).toBeUndefined();
      expect(await queue.getJobState(waiting.id)).toBe('unknown');
      expect(await waitingClaim.stored()).toBeNull();
    } finally {
      await worker.close();
      await queue.close();
      await deleteKeyspace(stack.redis, config().KEYFERRY_PREFIX);
    }
  });

  it('when the claim keeps changing under a request, then 409 idempotency_key_in_flight once the wait is over, not a loop without end', async () => {
    const { keys } = createStores(config(), stack.redis);
    const idempotency = new Idempotency(stack.redis, keys, 0); // every claim is stale at once
    const key = `churn-${randomUUID()}`;
    const redisKey = keys.idempotency('acme', sha256Hex(key));
    const body = { churn: true };
    try {
      await idempotency.claim('acme', key, body, 'first', async () => undefined);
      let loads = 0;
      // Another request takes the stale claim over between this request's read and its compare-and-set, every time.
      const load = async () => {
        loads++;
        const raw = (await stack.redis.get(redisKey)) as string;
        await stack.redis.set(redisKey, JSON.stringify({ ...(JSON.parse(raw) as object), id: `other-${loads}` }), 'EX', 60);
        return undefined;
      };
      await expect(idempotency.claim('acme', key, body, 'second', load, Date.now() + 300)).rejects.toMatchObject({ status: 409, code: 'idempotency_key_in_flight' });
      expect(loads).toBeGreaterThan(1);
      expect(JSON.parse((await stack.redis.get(redisKey)) as string)).toMatchObject({ id: `other-${loads}` });
    } finally {
      await stack.redis.del(redisKey);
    }
  });

  it('when a worker holds one job of a batch whose addBulk answer was lost, then the batch stays and all its jobs are queued again; else all of it goes', async () => {
    const { batches, keys } = createStores(config(), stack.redis);
    const queue = createUploadQueue(stack.redis, keys);
    const worker = holdingWorker(keys.bullPrefix);
    const makeBatch = async (total: number) => {
      const id = randomUUID();
      const now = new Date().toISOString();
      const batch = { id, account: 'acme', status: 'running' as const, total, created_at: now, updated_at: now, finished_at: null, callback_url: null, enqueued: 0, completions: 0 };
      await batches.create(batch, Array.from({ length: total }, (_, index) => record({ id, index })));
      const add = () => queue.addBulk(Array.from({ length: total }, (_, i) => ({ name: 'upload-key', data: { jobId: `${id}.${i}`, account: 'acme' }, opts: { jobId: `${id}.${i}` } })));
      const undo = () =>
        undoBatch(batches, id, total, Claim.none, {
          remove: (jobId) => queue.remove(jobId),
          enqueue: async () => {
            await add();
            await batches.markEnqueued(id);
          },
        });
      return { id, add, undo };
    };
    try {
      const accepted = await makeBatch(3);
      await queue.add('upload-key', { jobId: `${accepted.id}.1`, account: 'acme' }, { jobId: `${accepted.id}.1` });
      worker.run();
      await vi.waitFor(() => expect(worker.taken).toEqual([`${accepted.id}.1`]), { timeout: 5000 });
      await accepted.add(); // the other two, as if the addBulk had run and only its answer were lost
      await accepted.undo();
      expect(await batches.get(accepted.id)).toMatchObject({ batch: { enqueued: 1 }, counts: { queued: 3 } });
      const states = await Promise.all([0, 1, 2].map((i) => queue.getJobState(`${accepted.id}.${i}`)));
      expect(states[1]).toBe('active');
      for (const state of states) expect(['waiting', 'active']).toContain(state);
      await worker.close();

      const undone = await makeBatch(4);
      await undone.add();
      const before = await keysUnder(stack.redis, config().KEYFERRY_PREFIX);
      expect(before.filter((k) => k.includes(undone.id)).length).toBeGreaterThan(4);
      await undone.undo();
      expect((await keysUnder(stack.redis, config().KEYFERRY_PREFIX)).filter((k) => k.includes(undone.id))).toEqual([]);
    } finally {
      await worker.close();
      await queue.close();
      await deleteKeyspace(stack.redis, config().KEYFERRY_PREFIX);
    }
  });
});

describe('intake: batches recorded and never enqueued', () => {
  const config = () => ({ ...stack.config, KEYFERRY_PREFIX: `${stack.config.KEYFERRY_PREFIX}-stranded` });
  type Stores = ReturnType<typeof createStores>;
  /** A batch recorded as its request does before its addBulk, with the jobs in `added` enqueued as an addBulk cut short would have. */
  const strand = async (stores: Stores, queue: UploadQueue, total: number, o: { added?: number[]; claim?: string; id?: string } = {}) => {
    const id = o.id ?? randomUUID();
    const now = new Date().toISOString();
    const batch = { id, account: 'acme', status: 'running' as const, total, created_at: now, updated_at: now, finished_at: null, callback_url: null, enqueued: 0, completions: 0 };
    const jobs = Array.from({ length: total }, (_, index) =>
      newJobRecord({ id: `${id}.${index}`, account: 'acme', request: parseUploadKey(example), kmsId: 'kms', maxAttempts: 1, batch: { id, index } }),
    );
    await stores.batches.create({ ...batch, ...(o.claim ? { claim: o.claim } : {}) }, jobs);
    for (const i of o.added ?? []) await queue.add('upload-key', { jobId: `${id}.${i}`, account: 'acme' }, { jobId: `${id}.${i}` });
    return id;
  };
  const keysOf = async (prefix: string, id: string) => (await keysUnder(stack.redis, prefix)).filter((k) => k.includes(id));
  const listed = (stores: Stores, id: string) => stack.redis.zscore(stores.keys.strandedBatches(), id);
  /** As if the batches had been listed a minute ago (Redis runs on this machine: one clock). */
  const backdate = (stores: Stores, ...ids: string[]) => Promise.all(ids.map((id) => stack.redis.zadd(stores.keys.strandedBatches(), 'XX', Date.now() - 60_000, id)));
  const states = (queue: UploadQueue, id: string, total: number) => Promise.all(Array.from({ length: total }, (_, i) => queue.getJobState(`${id}.${i}`)));
  const none = { undone: 0, enqueued: 0, left: 0, nothing: 0, failed: 0 };
  const sum = (a: typeof none, b: typeof none) => Object.fromEntries(Object.entries(a).map(([k, v]) => [k, v + b[k as keyof typeof none]]));

  it('when batches stay recorded and not enqueued, then a recovery takes each back once, enqueues one a worker holds or ran a job of, and leaves one a retry with its Idempotency-Key or its own undo may still decide', async () => {
    const stores = createStores(config(), stack.redis);
    const queue = createUploadQueue(stack.redis, stores.keys);
    const intake = new Intake(config(), stack.redis, stores, queue);
    const idempotency = new Idempotency(stack.redis, stores.keys);
    const connection = new Redis(stack.config.REDIS_URL, { maxRetriesPerRequest: null });
    let letGo = () => undefined as void;
    const held = new Promise<void>((resolve) => (letGo = resolve));
    const taken: string[] = [];
    const worker = new Worker(
      UPLOAD_QUEUE,
      async (job) => {
        taken.push(String(job.id));
        await held;
      },
      { connection, prefix: stores.keys.bullPrefix, concurrency: 1 },
    );
    try {
      // A worker holds one job of the batch: it was accepted after all, and all its jobs are queued again.
      const holding = await strand(stores, queue, 3, { added: [1] });
      await vi.waitFor(() => expect(taken).toEqual([`${holding}.1`]), { timeout: 5000 });
      expect(await listed(stores, holding)).not.toBeNull();
      expect(await intake.recoverStrandedBatches(0)).toEqual({ ...none, enqueued: 1 });
      expect(await stores.batches.get(holding)).toMatchObject({ batch: { enqueued: 1 }, counts: { queued: 3 } });
      expect(await states(queue, holding, 3)).toEqual(['prioritized', 'active', 'prioritized']);
      expect(await listed(stores, holding)).toBeNull();
      letGo();
      await worker.close();

      // One of its jobs ran and waits for its retry in BullMQ's delayed set: enqueued without removing any job,
      // so the waiting one keeps its delay and its attempts.
      const ran = await strand(stores, queue, 2);
      await queue.add('upload-key', { jobId: `${ran}.0`, account: 'acme' }, { jobId: `${ran}.0`, delay: 60_000 });
      await stores.jobs.updateFrom((await stores.jobs.getHeld(`${ran}.0`))!, (j) => void (j.status = 'retrying'));
      const plain = await strand(stores, queue, 2); // the API process died between the MULTI and the addBulk
      const halfAdded = await strand(stores, queue, 3, { added: [0, 2] }); // ... during the addBulk
      const keyed = `stranded-${randomUUID()}`;
      const keyedClaim = stores.keys.idempotency('acme', sha256Hex(keyed));
      const awaiting = randomUUID(); // its claim still names it: a retry with the key would enqueue it
      await idempotency.claim('acme', keyed, { keyed }, awaiting, async () => undefined);
      await strand(stores, queue, 2, { id: awaiting, claim: keyedClaim });
      const otherKey = `stranded-${randomUUID()}`;
      const otherClaim = stores.keys.idempotency('acme', sha256Hex(otherKey));
      await idempotency.claim('acme', otherKey, { otherKey }, randomUUID(), async () => undefined); // a retry took this key over
      const takenOver = await strand(stores, queue, 1, { claim: otherClaim });
      const undoing = await strand(stores, queue, 1); // its request is taking it back right now
      expect(await stores.batches.beginUndo(undoing)).toBe('ok');
      const all = [ran, plain, halfAdded, awaiting, takenOver, undoing];

      // Not listed for long enough yet: left alone.
      expect(await intake.recoverStrandedBatches(30_000)).toEqual(none);
      for (const id of all) expect(await stores.batches.get(id)).toBeDefined();

      // Two API processes looking at once: each batch is taken by one of them.
      await backdate(stores, ...all);
      const [a, b] = await Promise.all([intake.recoverStrandedBatches(30_000), intake.recoverStrandedBatches(30_000)]);
      expect(sum(a, b)).toEqual({ ...none, undone: 3, enqueued: 1, left: 2 });
      for (const id of [plain, halfAdded, takenOver]) {
        expect(await keysOf(config().KEYFERRY_PREFIX, id)).toEqual([]);
        expect(await listed(stores, id)).toBeNull();
      }
      expect(await states(queue, halfAdded, 3)).toEqual(['unknown', 'unknown', 'unknown']);
      expect(await states(queue, ran, 2)).toEqual(['delayed', 'prioritized']);
      expect(await stores.batches.get(ran)).toMatchObject({ batch: { enqueued: 1 } });
      for (const id of [awaiting, undoing]) {
        expect(await stores.batches.get(id)).toMatchObject({ batch: { enqueued: 0 } });
        expect(await listed(stores, id)).not.toBeNull();
      }

      // Once its claim is gone (expired), no retry can enqueue it: it is taken back too.
      await stack.redis.del(keyedClaim);
      await backdate(stores, awaiting);
      expect(await intake.recoverStrandedBatches(30_000)).toEqual({ ...none, undone: 1 });
      expect(await keysOf(config().KEYFERRY_PREFIX, awaiting)).toEqual([]);
    } finally {
      letGo();
      await worker.close();
      connection.disconnect();
      await queue.close();
      await deleteKeyspace(stack.redis, config().KEYFERRY_PREFIX);
    }
  });

  it("when a recovery and the batch's own request cross, then one of them decides: a batch taken over is never marked enqueued, undone or deleted by its request, one enqueued or being undone is not taken over, one whose job started is never deleted", async () => {
    const stores = createStores(config(), stack.redis);
    const queue = createUploadQueue(stack.redis, stores.keys);
    try {
      // Taken over by a recovery: its request can neither mark it enqueued nor delete it; the recovery deletes it.
      const takenOver = await strand(stores, queue, 2);
      expect(await stores.batches.beginRecovery(takenOver, 30_000)).toBe('ok');
      await expect(stores.batches.markEnqueued(takenOver)).rejects.toThrow(/taken over/);
      expect(await stores.batches.beginUndo(takenOver)).toBe('recovering');
      expect(await stores.batches.delete(takenOver, 2)).toBe('recovering');
      expect(await stores.batches.get(takenOver)).toMatchObject({ batch: { enqueued: 0, recovering: true } });
      expect(await stores.batches.delete(takenOver, 2, 'recovery')).toBe('deleted');
      await expect(stores.batches.markEnqueued(takenOver)).rejects.toThrow(/deleted/);
      expect(await keysOf(config().KEYFERRY_PREFIX, takenOver)).toEqual([]); // the refused markEnqueued wrote nothing
      expect(await listed(stores, takenOver)).toBeNull();

      // Its request's undo, under way (stalled in its removes) when a recovery takes the batch over, leaves the
      // batch to the recovery: it neither deletes nor enqueues it.
      const crossed = await strand(stores, queue, 2, { added: [0, 1] });
      let goOn = () => undefined as void;
      const stalled = new Promise<void>((resolve) => (goOn = resolve));
      const stallingQueue = {
        remove: async (id: string) => (await stalled, queue.remove(id)),
        enqueue: () => Promise.reject(new Error('the request must leave the batch to the recovery')),
      };
      const undo = undoBatch(stores.batches, crossed, 2, Claim.none, stallingQueue);
      await vi.waitFor(async () => expect(await stack.redis.hget(stores.keys.batch(crossed), 'undoing')).not.toBeNull());
      expect(await stores.batches.beginRecovery(crossed, 30_000)).toBe('busy'); // its undo began less than 30 s ago
      expect(await stores.batches.beginRecovery(crossed, 0)).toBe('ok'); // ... but more than 0 ms ago
      goOn();
      await undo;
      expect(await stores.batches.get(crossed)).toMatchObject({ batch: { recovering: true }, counts: { queued: 2 } });

      // Marked enqueued by its request first: no recovery takes it over, and a recovery's delete refuses it.
      const marked = await strand(stores, queue, 2);
      await stores.batches.markEnqueued(marked);
      expect(await listed(stores, marked)).toBeNull();
      expect(await stores.batches.beginRecovery(marked, 0)).toBe('enqueued');
      expect(await stores.batches.delete(marked, 2, 'recovery')).toBe('kept');
      // Its request's own undo (the mark ran, its answer was lost) still deletes it: the 500 it answers is true.
      expect(await stores.batches.delete(marked, 2)).toBe('deleted');
      expect(await keysOf(config().KEYFERRY_PREFIX, marked)).toEqual([]);

      // A worker started one of its jobs after the undo read the counts: the delete refuses, the undo puts the jobs back.
      const started = await strand(stores, queue, 2, { added: [0, 1] });
      expect(await stores.batches.get(started)).toMatchObject({ counts: { queued: 2 } });
      await stores.jobs.updateFrom((await stores.jobs.getHeld(`${started}.1`))!, (j) => void (j.status = 'running'));
      expect(await stores.batches.delete(started, 2)).toBe('kept');
      expect(await stores.batches.beginRecovery(started, 0)).toBe('ok');
      expect(await stores.batches.delete(started, 2, 'recovery')).toBe('kept');
      expect(await stores.jobs.get(`${started}.1`)).toMatchObject({ status: 'running' });

      // While one API process handles a batch, another does not take it: each batch's listing is renewed (relist).
      const slow = await strand(stores, queue, 1);
      await backdate(stores, slow);
      expect(await stores.batches.takeStranded(30_000, 100)).toContain(slow);
      await backdate(stores, slow); // handling the batches taken before it took that long
      await stores.batches.relist(slow);
      expect(await stores.batches.takeStranded(30_000, 100)).not.toContain(slow);
      await stores.batches.unlist(slow);
      await stores.batches.relist(slow); // never lists again a batch taken off the list
      expect(await listed(stores, slow)).toBeNull();
    } finally {
      await queue.close();
      await deleteKeyspace(stack.redis, config().KEYFERRY_PREFIX);
    }
  });

  it('when a batch request stalls past the recovery age before its MULTI and a recovery unlists the batch it cannot find yet, then the batch is listed again once recorded', async () => {
    // A client of the store's own, whose MULTIs wait until the test lets them go on.
    const client = new Redis(stack.config.REDIS_URL);
    let goOn = () => undefined as void;
    const stall = new Promise<void>((resolve) => (goOn = resolve));
    const multi = client.multi.bind(client);
    client.multi = ((...args: Parameters<typeof client.multi>) => {
      const m = multi(...args);
      const exec = m.exec.bind(m);
      m.exec = (async () => {
        await stall;
        return exec();
      }) as typeof m.exec;
      return m;
    }) as typeof client.multi;
    const stores = createStores(config(), client);
    const queue = createUploadQueue(stack.redis, stores.keys);
    const intake = new Intake(config(), stack.redis, createStores(config(), stack.redis), queue);
    try {
      const id = randomUUID();
      const creating = strand(stores, queue, 2, { id });
      await vi.waitFor(async () => expect(await listed(stores, id)).not.toBeNull());
      expect(await intake.recoverStrandedBatches(0)).toEqual({ ...none, nothing: 1 }); // no record yet: unlisted
      expect(await listed(stores, id)).toBeNull();
      goOn();
      await creating;
      expect(await listed(stores, id)).not.toBeNull();
      await backdate(stores, id);
      expect(await intake.recoverStrandedBatches(30_000)).toEqual({ ...none, undone: 1 });
      expect(await keysOf(config().KEYFERRY_PREFIX, id)).toEqual([]);
    } finally {
      goOn();
      client.disconnect();
      await queue.close();
      await deleteKeyspace(stack.redis, config().KEYFERRY_PREFIX);
    }
  });

  it('when a batch request stalls past the recovery age between its MULTI and its addBulk, then the recovery takes the batch back and the request answers 500, leaving nothing behind', async () => {
    // The stack's own keyspace: its KMS connection is there. Nothing else of this file is listed as not enqueued.
    const stores = createStores(stack.config, stack.redis);
    let goOn = () => undefined as void;
    const stall = new Promise<void>((resolve) => (goOn = resolve));
    let arrived = () => undefined as void;
    const atAddBulk = new Promise<void>((resolve) => (arrived = resolve));
    /** The real queue, whose addBulk waits until the test lets it go on. */
    class StallingQueue extends Queue<UploadJobData> {
      override async addBulk(...args: Parameters<Queue<UploadJobData>['addBulk']>) {
        arrived();
        await stall;
        return super.addBulk(...args);
      }
    }
    const queue = new StallingQueue(UPLOAD_QUEUE, { connection: stack.redis, prefix: stores.keys.bullPrefix });
    const intake = new Intake(stack.config, stack.redis, stores, queue);
    let batchId = '';
    try {
      const items = [1, 2].map((i) => ({ ...example, aws_param: { ...(example.aws_param as object), Alias: `alias/stalled-${i}` } }));
      const submitted = intake.submitBatch('acme', { items }, undefined).then(
        () => 'accepted',
        (err: Error) => err.message,
      );
      await atAddBulk;
      const listedNow = await stack.redis.zrange(stores.keys.strandedBatches(), 0, -1);
      expect(listedNow).toHaveLength(1);
      batchId = listedNow[0] as string;
      expect(await intake.recoverStrandedBatches(0)).toEqual({ ...none, undone: 1 });
      goOn();
      expect(await submitted).toMatch(/taken over by a recovery, or deleted/);
      expect(await keysOf(stack.config.KEYFERRY_PREFIX, batchId)).toEqual([]);
      // The stalled addBulk added the jobs after the recovery's removes; the request's own undo, finding the batch
      // gone, removed them again.
      expect(await states(queue, batchId, 2)).toEqual(['unknown', 'unknown']);
    } finally {
      goOn();
      await Promise.all([0, 1].map((i) => queue.remove(`${batchId}.${i}`)));
      await queue.close();
    }
  });

  it('when an API process runs, then it takes back a batch stranded for BATCH_RECOVERY_AFTER_MS by itself and counts it in /metrics', async () => {
    const stores = createStores(config(), stack.redis);
    const queue = createUploadQueue(stack.redis, stores.keys);
    const api = await startApi({ ...config(), PORT: 0, BATCH_RECOVERY_AFTER_MS: 10_000 }, createLogger('silent'));
    try {
      const undoneSoFar = async () => Number(/^keyferry_batches_recovered_total\{outcome="undone"\} (\d+)/m.exec(await (await fetch(`${api.url}/metrics`)).text())?.[1]);
      const before = await undoneSoFar(); // 0 or more: the series is there from the start
      expect(before).toBeGreaterThanOrEqual(0);
      const id = await strand(stores, queue, 2, { added: [1] });
      await backdate(stores, id); // looked for every 2.5 s
      await vi.waitFor(async () => expect(await keysOf(config().KEYFERRY_PREFIX, id)).toEqual([]), { timeout: 10_000, interval: 200 });
      expect(await queue.getJobState(`${id}.1`)).toBe('unknown');
      expect(await undoneSoFar()).toBe(before + 1);
    } finally {
      await api.close();
      await queue.close();
      await deleteKeyspace(stack.redis, config().KEYFERRY_PREFIX);
    }
  });
});

describe('intake: auth and ownership', () => {
  it('when no token is sent, then 401 problem with WWW-Authenticate', async () => {
    const res = await stack.call('POST', '/api/v1/cckm/aws/upload-key', { body: example });
    expect(res.status).toBe(401);
    expect(res.headers.get('www-authenticate')).toBe('Bearer');
    expect(res.headers.get('content-type')).toMatch(/^application\/problem\+json/);
  });

  it('when the token is signed with another secret, then 401', async () => {
    const forged = await stack.token('acme', { secret: 'x'.repeat(40) });
    expect((await upload(example, {}, forged)).status).toBe(401);
  });

  it('when the token has expired, then 401', async () => {
    const expired = await stack.token('acme', { ttlSeconds: -60 });
    expect((await upload(example, {}, expired)).status).toBe(401);
  });

  it('when the token has no exp or no acc claim, then 401', async () => {
    const key = new TextEncoder().encode(stack.config.JWT_SECRET);
    const noExp = await new SignJWT({ acc: 'acme' }).setProtectedHeader({ alg: 'HS256' }).sign(key);
    const noAcc = await new SignJWT({}).setProtectedHeader({ alg: 'HS256' }).setExpirationTime('1h').sign(key);
    expect((await upload(example, {}, noExp)).status).toBe(401);
    expect((await upload(example, {}, noAcc)).status).toBe(401);
  });

  it("when another account asks for a job or a connection, then 404 (not 403)", async () => {
    const res = await upload(example);
    const other = await stack.token('initech');
    const job = await stack.call('GET', `/api/v1/jobs/${res.body.id}`, { token: other });
    expect(job.status).toBe(404);
    expect((await stack.call('DELETE', `/api/v1/jobs/${res.body.id}`, { token: other })).status).toBe(404);
    const conns = await stack.call('GET', '/api/v1/cckm/aws/kms', { token: other });
    expect(conns.body.total).toBe(0);
    expect((await stack.call('GET', '/api/v1/cckm/aws/keys/does-not-exist', { token })).status).toBe(404);
  });

  it('when health and readiness are asked without a token, then they answer', async () => {
    expect((await stack.call('GET', '/healthz')).status).toBe(200);
    const ready = await stack.call('GET', '/readyz');
    expect(ready.status).toBe(200);
    expect(ready.body.redis).toBe('ok');
  });
});

describe('resources: KMS connections, templates, local keys', () => {
  it('when a connection is created, then the secret is never returned and is encrypted in Redis', async () => {
    const list = await stack.call('GET', '/api/v1/cckm/aws/kms', { token });
    expect(list.status).toBe(200);
    expect(JSON.stringify(list.body)).not.toContain(EMULATOR_SECRET_KEY);
    expect(list.body.resources[0]).toMatchObject({ name: 'kms', account_id: '123456789012', credentials_type: 'access_key' });
    const one = await stack.call('GET', `/api/v1/cckm/aws/kms/${list.body.resources[0].id}`, { token });
    expect(one.body.name).toBe('kms');
    const stored = await redisValuesUnder(stack.redis, stack.config.KEYFERRY_PREFIX);
    expect(stored.some((v) => v.includes(EMULATOR_SECRET_KEY))).toBe(false);
  });

  it('when a connection name is reused, then 409; bad fields give 400 with paths', async () => {
    const dup = await stack.call('POST', '/api/v1/cckm/aws/kms', { token, body: { name: 'kms', account_id: '123456789012', regions: ['us-east-1'] } });
    expect(dup.status).toBe(409);
    const bad = await stack.call('POST', '/api/v1/cckm/aws/kms', { token, body: { name: 'x', account_id: '12', regions: [], aws_access_key_id: 'AKIAABCDEFGHIJKLMNOP' } });
    expect(bad.status).toBe(400);
    expect(bad.body.errors.map((e: { path: string }) => e.path)).toEqual(expect.arrayContaining(['account_id', 'regions']));
  });

  it('when a local key is imported, then its id is 64 hex and its material never comes back', async () => {
    const material = 'ab'.repeat(32);
    const res = await stack.call('POST', '/api/v1/vault/keys2', { token, body: { name: 'imported-1', material } });
    expect(res.status).toBe(201);
    expect(res.body.id).toMatch(/^[0-9a-f]{64}$/);
    expect(res.body.origin).toBe('imported');
    const list = await stack.call('GET', '/api/v1/vault/keys2', { token });
    expect(JSON.stringify(list.body)).not.toContain(material);
    const stored = await redisValuesUnder(stack.redis, stack.config.KEYFERRY_PREFIX);
    expect(stored.some((v) => v.includes(material))).toBe(false);
    const bad = await stack.call('POST', '/api/v1/vault/keys2', { token, body: { name: 'bad', algorithm: 'RSA', size: 2048, material: 'zz' } });
    expect(bad.body.errors.map((e: { path: string }) => e.path)).toEqual(['algorithm', 'size', 'material']);
  });

  it('when a template is created, then it is listed with its policy as an object', async () => {
    const res = await stack.call('POST', '/api/v1/cckm/aws/templates', { token, body: { name: 't-1', policy: '{"Version":"2012-10-17","Statement":[]}' } });
    expect(res.status).toBe(201);
    const list = await stack.call('GET', '/api/v1/cckm/aws/templates', { token });
    expect(list.body.resources).toEqual([expect.objectContaining({ name: 't-1', policy: { Version: '2012-10-17', Statement: [] } })]);
  });
});
