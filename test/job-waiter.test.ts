/**
 * JobWaiter (Prefer: wait) against real Redis and real BullMQ events: jobs are finished by hand through a
 * BullMQ Worker without a processor (getNextJob + moveToCompleted), which adds the same events a worker does.
 */
import { Worker, type Job } from 'bullmq';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { JobWaiter, uploadQueueWaiting, type EventSubscription, type JobWaiterOptions } from '../api/job-waiter.js';
import { loadConfig } from '../shared/config.js';
import { UPLOAD_QUEUE, type UploadJobData } from '../shared/jobs.js';
import { closeQueueEvents, createUploadQueue, createUploadQueueEvents, type UploadQueue } from '../shared/queues.js';
import { createRedis, type RedisClient } from '../shared/redis.js';
import { Redis } from 'ioredis';
import { deleteKeyspace, Keyspace } from '../shared/stores/keyspace.js';
import { OwnRedis } from './helpers/redis-server.js';
import { testEnv } from './helpers/stack.js';

const config = loadConfig(testEnv('job-waiter'));
let redis: Redis;
let keys: Keyspace;
let queue: UploadQueue;
let worker: Worker<UploadJobData>;
let workerRedis: RedisClient;
const token = 'job-waiter-test';

beforeAll(async () => {
  redis = new Redis(config.REDIS_URL);
  keys = new Keyspace(config.KEYFERRY_PREFIX);
  queue = createUploadQueue(redis, keys);
  workerRedis = createRedis(config);
  worker = new Worker<UploadJobData>(UPLOAD_QUEUE, undefined, { connection: workerRedis as never, prefix: keys.bullPrefix });
});

afterAll(async () => {
  await worker.close();
  workerRedis.disconnect();
  await queue.close();
  await deleteKeyspace(redis, config.KEYFERRY_PREFIX);
  redis.disconnect();
});

/** Adds a job and takes it as a worker would; `finish` completes it, which adds BullMQ's `completed` event. */
async function activeJob(id: string): Promise<{ finish(): Promise<void> }> {
  await queue.add('upload-key', { jobId: id, account: 'acc' }, { jobId: id });
  const job = (await worker.getNextJob(token)) as Job<UploadJobData>;
  expect(job.id).toBe(id);
  return { finish: async () => void (await job.moveToCompleted('done', token, false)) };
}

/** The API's own options (uploadQueueWaiting), with a log of the subscriptions opened and closed. */
function waiterOptions(extra: Partial<JobWaiterOptions> = {}) {
  const log = { opened: 0, closed: 0 };
  const api = uploadQueueWaiting({ config, redis, queue, keys, onError: () => undefined });
  const opts: JobWaiterOptions = {
    ...api,
    subscribe: (lastEventId): EventSubscription => {
      log.opened++;
      const subscription = api.subscribe(lastEventId);
      return {
        events: subscription.events,
        async close() {
          log.closed++;
          await subscription.close();
        },
      };
    },
    ...extra,
  };
  return { opts, log };
}

/** A subscription like the API's whose first read of the stream comes `delayMs` late (a slow connection). */
function slowSubscription(delayMs: number) {
  return (lastEventId: string): EventSubscription => {
    const events = createUploadQueueEvents(createRedis(config, { lazyConnect: true }), keys, { lastEventId, autorun: false });
    const started = new Promise((r) => setTimeout(r, delayMs)).then(() => events.run());
    started.catch(() => undefined);
    return { events, close: () => closeQueueEvents(events) };
  };
}

describe('JobWaiter', () => {
  it('opens no subscription until a request waits, then wakes that request on its job\'s completion', async () => {
    const { opts, log } = waiterOptions({ lingerMs: 60_000 });
    const waiter = new JobWaiter(opts);
    expect(waiter.subscribed).toBe(false);
    const job = await activeJob('wake-1');
    let done = false;
    const waited = waiter.wait('wake-1', 60_000, async () => done);
    await new Promise((r) => setTimeout(r, 100));
    expect(waiter.subscribed).toBe(true);
    done = true;
    await job.finish();
    // Resolved by the event: the 60 s timeout would outlast the test's own timeout.
    await waited;
    expect(log.opened).toBe(1);
    await waiter.close();
    expect(log.closed).toBe(1);
    expect(waiter.subscribed).toBe(false);
  });

  it('does not miss a job that finishes before the subscription\'s first read: it reads from the entry taken before the first check', async () => {
    const from: string[] = [];
    const { opts } = waiterOptions({ lingerMs: 60_000 });
    const waiter = new JobWaiter({ ...opts, subscribe: (id) => (from.push(id), slowSubscription(300)(id)) });
    const job = await activeJob('race-1');
    let checks = 0;
    await waiter.wait('race-1', 5000, async () => {
      checks++;
      if (checks > 1) return true;
      // The job's event is added now, while the subscription has not read yet (it starts after 300 ms).
      await job.finish();
      return false;
    });
    expect(checks).toBe(2); // 1 if the event was missed and the wait timed out
    expect(from[0]).toMatch(/^\d+-\d+$/);
    await waiter.close();
  });

  it('keeps waiting when an event comes but the job is not done yet, and times out when nothing more comes', async () => {
    const { opts } = waiterOptions({ lingerMs: 60_000 });
    const waiter = new JobWaiter(opts);
    const job = await activeJob('not-done-1');
    let checks = 0;
    const started = Date.now();
    const waited = waiter.wait('not-done-1', 1500, async () => {
      checks++;
      return false;
    });
    await new Promise((r) => setTimeout(r, 200));
    await job.finish();
    await waited;
    expect(checks).toBe(2); // once at the start, once after the event
    expect(Date.now() - started).toBeGreaterThanOrEqual(1400);
    await waiter.close();
  });

  it('closes the subscription once no request has waited for lingerMs, and opens a new one for the next wait', async () => {
    const { opts, log } = waiterOptions({ lingerMs: 50 });
    const waiter = new JobWaiter(opts);
    await waiter.wait('nothing-1', 10, async () => false);
    await waiter.wait('nothing-2', 10, async () => false); // within the linger: the same subscription
    expect(log.opened).toBe(1);
    await expect.poll(() => waiter.subscribed, { timeout: 5000 }).toBe(false);
    expect(log.closed).toBe(1);
    await waiter.wait('nothing-3', 10, async () => true);
    expect(log.opened).toBe(2);
    await waiter.close();
    expect(log.closed).toBe(2);
  });

  it('resolves at once, without checking, when no subscription can be opened (Redis away)', async () => {
    const { opts } = waiterOptions({ lastEventId: () => Promise.reject(new Error('Connection is closed.')) });
    const waiter = new JobWaiter(opts);
    let checks = 0;
    await waiter.wait('away-1', 60_000, async () => {
      checks++;
      return false;
    });
    expect(checks).toBe(0);
    expect(waiter.subscribed).toBe(false);
  });
});

describe('JobWaiter while Redis is away', () => {
  it('closes the subscription at once, and once Redis is back nothing of it reconnects to read events', async () => {
    const own = await OwnRedis.start();
    const ownConfig = loadConfig(testEnv('job-waiter-outage', { REDIS_URL: own.url }));
    const client = new Redis(own.url, { maxRetriesPerRequest: null });
    client.on('error', () => undefined);
    const ownKeys = new Keyspace(ownConfig.KEYFERRY_PREFIX);
    const ownQueue = createUploadQueue(client, ownKeys);
    const waiter = new JobWaiter({ ...uploadQueueWaiting({ config: ownConfig, redis: client, queue: ownQueue, keys: ownKeys, onError: () => undefined }), lingerMs: 60_000 });
    /** The clients whose last command was a stream read: the subscription's. */
    const readers = async () => ((await client.client('LIST')) as string).split('\n').filter((l) => / cmd=xread /.test(l)).length;
    try {
      await waiter.wait('outage-1', 300, async () => false);
      await expect.poll(readers, { timeout: 5000 }).toBe(1);

      await own.kill();
      const started = Date.now();
      await waiter.close();
      expect(Date.now() - started).toBeLessThan(2000); // not waiting for Redis to come back
      expect(waiter.subscribed).toBe(false);

      await own.restart();
      await client.ping();
      // A subscription left running would reconnect (ioredis retries within 2 s) and read again.
      await new Promise((r) => setTimeout(r, 3000));
      expect(await readers()).toBe(0);
    } finally {
      await ownQueue.close();
      client.disconnect();
      await own.stop();
    }
  }, 30_000);
});
