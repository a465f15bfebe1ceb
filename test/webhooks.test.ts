import http from 'node:http';
import type { AddressInfo } from 'node:net';
import express from 'express';
import { Redis } from 'ioredis';
import { Webhook } from 'standardwebhooks';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { requireAuth } from '../api/auth.js';
import { problemHandler } from '../api/problem.js';
import { webhookRoutes } from '../api/routes/webhooks.js';
import { signToken } from '../shared/auth.js';
import { loadConfig, type Config } from '../shared/config.js';
import { createStores, type Stores } from '../shared/context.js';
import type { JobRecord } from '../shared/jobs.js';
import { createLogger } from '../shared/logger.js';
import { deleteKeyspace } from '../shared/stores/keyspace.js';
import { WebhookSecretStore } from '../shared/stores/webhook-secret-store.js';
import {
  GoneUrls,
  WebhookDeliveries,
  createWebhookQueue,
  enqueueWebhook,
  type DeliveryRecord,
  type WebhookEvent,
  type WebhookQueue,
} from '../shared/webhooks.js';
import { retryAfterMs, startWebhookWorker, type WebhookWorkerHandle } from '../worker/webhook-delivery.js';
import { redisValuesUnder } from './helpers/redis-dump.js';
import { Receiver } from './helpers/receiver.js';
import { LogSink, TEST_REDIS_URL, testEnv } from './helpers/stack.js';


/** One worker + the producer side (queue, secret store, deliveries list) on its own Redis prefix. */
interface Setup {
  config: Config;
  worker: WebhookWorkerHandle;
  queue: WebhookQueue;
  secrets: WebhookSecretStore;
  deliveries: WebhookDeliveries;
  stores: Stores;
}

const GRACE = 3600;
const receiver = new Receiver();
const redis = new Redis(TEST_REDIS_URL);
const logs = new LogSink();
const logger = createLogger('debug', 'webhooks-test', logs);
/** Every secret issued here, for the leak checks at the end. */
const issued: string[] = [];
const setups: Setup[] = [];

async function setUp(env: Record<string, string>): Promise<Setup> {
  const config = loadConfig(testEnv('webhooks', { WEBHOOK_ALLOW_HTTP: 'true', WEBHOOK_RETRY_SCHEDULE: '0.05,0.05,0.05', ...env }));
  const stores = createStores(config, redis);
  const setup: Setup = {
    config,
    worker: await startWebhookWorker(config, logger),
    queue: createWebhookQueue(redis, stores.keys),
    secrets: new WebhookSecretStore(redis, stores.keys, stores.box),
    deliveries: new WebhookDeliveries(redis, stores.keys),
    stores,
  };
  setups.push(setup);
  return setup;
}

async function newSecret(s: Setup, account: string, grace = GRACE): Promise<string> {
  const { secret } = await s.secrets.rotate(account, grace);
  issued.push(secret);
  return secret;
}

let seq = 0;
function event(path: string, overrides: Partial<WebhookEvent> = {}): WebhookEvent {
  seq += 1;
  return {
    type: 'upload-key.succeeded',
    account: 'acme',
    url: receiver.url(path),
    ownerId: `job-${seq}`,
    data: { id: `job-${seq}`, status: 'succeeded' },
    dedupeId: `job:job-${seq}:succeeded`,
    ...overrides,
  };
}

async function waitForDeliveries(s: Setup, ownerId: string, done: (list: DeliveryRecord[]) => boolean, timeoutMs = 5000): Promise<DeliveryRecord[]> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const list = await s.deliveries.list(ownerId);
    if (done(list)) return list;
    if (Date.now() > deadline) throw new Error(`deliveries of ${ownerId} did not settle: ${JSON.stringify(list)}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

const settled = (list: DeliveryRecord[]) => list.length > 0 && list.at(-1)?.next_attempt_at === null;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

// Allowed: loopback (::1 too, in case `localhost` also resolves to it on the machine running the tests).
let main: Setup;
let acmeSecret: string;

beforeAll(async () => {
  await receiver.start();
  main = await setUp({ WEBHOOK_ALLOW_CIDRS: '127.0.0.0/8,::1/128', WEBHOOK_TIMEOUT_MS: '300' });
  acmeSecret = await newSecret(main, 'acme');
});

afterAll(async () => {
  for (const s of setups) {
    await s.worker.close();
    await s.queue.close();
    await deleteKeyspace(redis, s.config.KEYFERRY_PREFIX);
  }
  await receiver.close();
  redis.disconnect();
});

describe('webhook delivery', () => {
  it('when an event is enqueued, then the receiver gets one POST whose Standard Webhooks signature verifies, and the attempt is recorded', async () => {
    const ev = event('/delivered');
    await enqueueWebhook(main.queue, ev);
    const [record] = await waitForDeliveries(main, ev.ownerId, settled);

    const [req] = receiver.at('/delivered');
    expect(receiver.at('/delivered')).toHaveLength(1);
    expect(req?.headers['content-type']).toBe('application/json');
    const payload = new Webhook(acmeSecret).verify(req?.body ?? '', req?.headers ?? {});
    expect(payload).toEqual({ type: 'upload-key.succeeded', timestamp: expect.stringMatching(/^\d{4}-\d\d-\d\dT/), data: ev.data });
    expect(req?.headers['webhook-id']).toMatch(/^msg_[0-9a-f]{32}$/);
    expect(record).toEqual({
      id: req?.headers['webhook-id'],
      event_type: 'upload-key.succeeded',
      url: ev.url,
      attempt: 1,
      at: expect.any(String),
      status_code: 200,
      latency_ms: expect.any(Number),
      outcome: 'delivered',
      error: null,
      next_attempt_at: null,
    });
  });

  it('when the receiver answers 500 twice, then the worker retries with the same webhook-id and the third attempt is delivered', async () => {
    receiver.answer('/flaky', { status: 500 }, { status: 500 });
    const ev = event('/flaky');
    await enqueueWebhook(main.queue, ev);
    const list = await waitForDeliveries(main, ev.ownerId, settled);

    expect(list.map((d) => [d.attempt, d.outcome, d.status_code])).toEqual([
      [1, 'failed', 500],
      [2, 'failed', 500],
      [3, 'delivered', 200],
    ]);
    expect(list[0]?.error).toBe('http_500');
    expect(list[0]?.next_attempt_at).not.toBeNull();
    const requests = receiver.at('/flaky');
    expect(requests).toHaveLength(3);
    expect(new Set(requests.map((r) => r.headers['webhook-id'])).size).toBe(1);
  });

  it('when the receiver fails every attempt, then delivery stops once the retry schedule is used up', async () => {
    receiver.answer('/down', ...Array.from({ length: 10 }, () => ({ status: 503 })));
    const ev = event('/down');
    await enqueueWebhook(main.queue, ev);
    const list = await waitForDeliveries(main, ev.ownerId, settled);
    await sleep(200);

    expect(list.map((d) => d.outcome)).toEqual(['failed', 'failed', 'failed', 'failed']); // first try + 3 retries
    expect(receiver.at('/down')).toHaveLength(4);
    const msgId = list[0]?.id ?? '';
    expect(await (await main.queue.getJob(msgId))?.getState()).toBe('failed');
  });

  it('when the receiver answers 410 Gone, then there is no retry and later events to that URL are skipped, not sent', async () => {
    receiver.answer('/gone', { status: 410 });
    const first = event('/gone');
    await enqueueWebhook(main.queue, first);
    const firstList = await waitForDeliveries(main, first.ownerId, settled);
    expect(firstList.map((d) => [d.outcome, d.status_code])).toEqual([['gone', 410]]);

    const later = event('/gone', { type: 'upload-key.failed' });
    await enqueueWebhook(main.queue, later);
    const laterList = await waitForDeliveries(main, later.ownerId, settled);
    expect(laterList).toMatchObject([{ outcome: 'skipped', status_code: null, event_type: 'upload-key.failed' }]);
    expect(receiver.at('/gone')).toHaveLength(1);
  });

  it('when the receiver redirects (302), then the redirect is not followed and the attempt fails', async () => {
    receiver.answer('/redirect', ...Array.from({ length: 4 }, () => ({ status: 302, headers: { location: '/redirect-target' } })));
    const ev = event('/redirect');
    await enqueueWebhook(main.queue, ev);
    const list = await waitForDeliveries(main, ev.ownerId, settled);

    expect(list[0]).toMatchObject({ outcome: 'failed', status_code: 302 });
    expect(list.every((d) => d.outcome === 'failed')).toBe(true);
    expect(receiver.at('/redirect-target')).toHaveLength(0);
  });

  it('when the receiver answers 429 with Retry-After: 1, then the next attempt waits at least that second', async () => {
    receiver.answer('/throttled', { status: 429, headers: { 'retry-after': '1' } });
    const ev = event('/throttled');
    await enqueueWebhook(main.queue, ev);
    const list = await waitForDeliveries(main, ev.ownerId, settled);

    expect(list.map((d) => d.outcome)).toEqual(['failed', 'delivered']);
    const [first, second] = receiver.at('/throttled');
    expect((second?.at ?? 0) - (first?.at ?? 0)).toBeGreaterThanOrEqual(950);
    expect(Date.parse(list[0]?.next_attempt_at ?? '') - Date.parse(list[0]?.at ?? '')).toBeGreaterThanOrEqual(1000);
  });

  it('when the receiver does not answer within WEBHOOK_TIMEOUT_MS, then the attempt fails as a timeout and is retried', async () => {
    receiver.answer('/slow', { status: 200, delayMs: 1000 });
    const ev = event('/slow');
    await enqueueWebhook(main.queue, ev);
    const list = await waitForDeliveries(main, ev.ownerId, settled);

    expect(list.map((d) => [d.outcome, d.error])).toEqual([
      ['failed', 'timeout'],
      ['delivered', null],
    ]);
  });

  it('when the same event is enqueued twice, at once or after its delivery, then it is delivered once', async () => {
    const ev = event('/dedupe');
    await Promise.all([enqueueWebhook(main.queue, ev), enqueueWebhook(main.queue, { ...ev })]);
    await waitForDeliveries(main, ev.ownerId, settled);
    await enqueueWebhook(main.queue, ev);
    await sleep(300);

    expect(receiver.at('/dedupe')).toHaveLength(1);
    expect(await main.deliveries.list(ev.ownerId)).toHaveLength(1);
  });

  it('when the account has no webhook secret, then nothing is sent and the attempt fails with no_webhook_secret', async () => {
    const ev = event('/no-secret', { account: 'nosecret' });
    await enqueueWebhook(main.queue, ev);
    const list = await waitForDeliveries(main, ev.ownerId, settled);

    expect(list[0]).toMatchObject({ outcome: 'failed', error: 'no_webhook_secret', status_code: null });
    expect(receiver.at('/no-secret')).toHaveLength(0);
  });

  it('when the secret was rotated and the old one is in grace, then both signatures are sent and either secret verifies', async () => {
    const oldSecret = await newSecret(main, 'rotating');
    const newer = await newSecret(main, 'rotating');
    const ev = event('/rotated', { account: 'rotating' });
    await enqueueWebhook(main.queue, ev);
    await waitForDeliveries(main, ev.ownerId, settled);

    const [req] = receiver.at('/rotated');
    const headers = req?.headers ?? {};
    expect(headers['webhook-signature']?.split(' ')).toHaveLength(2);
    expect(new Webhook(oldSecret).verify(req?.body ?? '', headers)).toMatchObject({ data: ev.data });
    expect(new Webhook(newer).verify(req?.body ?? '', headers)).toMatchObject({ data: ev.data });
    expect(() => new Webhook(acmeSecret).verify(req?.body ?? '', headers)).toThrow(/No matching signature/);
  });

  it('when a rotation has no grace, then only the new secret signs', async () => {
    await newSecret(main, 'nograce');
    const current = await newSecret(main, 'nograce', 0);
    expect(await main.secrets.signingSecrets('nograce')).toEqual([current]);
  });

  it('when the URL resolves to 127.0.0.1 and no CIDR allows it, then the delivery is recorded as forbidden, not sent and not retried', async () => {
    const strict = await setUp({});
    await newSecret(strict, 'acme');
    const ev = event('/forbidden');
    await enqueueWebhook(strict.queue, ev);
    await waitForDeliveries(strict, ev.ownerId, settled);
    await sleep(200);

    expect(await strict.deliveries.list(ev.ownerId)).toMatchObject([{ outcome: 'forbidden', error: 'forbidden_address', status_code: null, attempt: 1 }]);
    expect(receiver.at('/forbidden')).toHaveLength(0);
  });
});

describe('Retry-After parsing', () => {
  it('when Retry-After is seconds or an HTTP date, then it becomes a delay in ms; else undefined', () => {
    const now = Date.parse('2025-01-01T00:00:00Z');
    expect(retryAfterMs('120', now)).toBe(120_000);
    expect(retryAfterMs('Wed, 01 Jan 2025 00:00:30 GMT', now)).toBe(30_000);
    expect(retryAfterMs('Tue, 31 Dec 2024 23:00:00 GMT', now)).toBe(0);
    expect(retryAfterMs('soon', now)).toBeUndefined();
    expect(retryAfterMs(undefined, now)).toBeUndefined();
  });
});

describe('webhook routes', () => {
  let url: string;
  let server: http.Server;
  const batchOwners: Record<string, string> = { 'batch-1': 'acme' };
  const call = async (method: string, path: string, account?: string) => {
    const headers: Record<string, string> = account ? { authorization: `Bearer ${await signToken({ secret: main.config.JWT_SECRET, account })}` } : {};
    const res = await fetch(`${url}${path}`, { method, headers });
    const text = await res.text();
    return { status: res.status, headers: res.headers, body: (text ? JSON.parse(text) : undefined) as any };
  };

  beforeAll(async () => {
    const app = express();
    app.use('/api', requireAuth({ secret: main.config.JWT_SECRET }));
    app.use(
      webhookRoutes({
        stores: main.stores,
        secrets: main.secrets,
        deliveries: main.deliveries,
        gone: new GoneUrls(redis, main.stores.keys),
        graceSeconds: GRACE,
        ownsBatch: async (account, id) => batchOwners[id] === account,
      }),
    );
    app.use(problemHandler(logger));
    server = await new Promise<http.Server>((resolve) => {
      const s = app.listen(0, '127.0.0.1', () => resolve(s));
    });
    url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  });
  afterAll(async () => {
    await new Promise((resolve) => server.close(resolve));
  });

  it('when an account asks for a secret, then 201 shows it once; a second call rotates it and dates the grace of the old one', async () => {
    const first = await call('POST', '/api/v1/webhooks/secret', 'routes');
    expect(first.status).toBe(201);
    expect(first.headers.get('cache-control')).toBe('no-store');
    expect(first.body).toEqual({ secret: expect.stringMatching(/^whsec_[A-Za-z0-9+/]{43}=$/), previous_valid_until: null, created_at: expect.any(String) });
    issued.push(first.body.secret);

    const second = await call('POST', '/api/v1/webhooks/secret', 'routes');
    issued.push(second.body.secret);
    expect(second.body.secret).not.toBe(first.body.secret);
    const graceLeft = Date.parse(second.body.previous_valid_until) - Date.now();
    expect(graceLeft).toBeGreaterThan((GRACE - 60) * 1000);
    expect(graceLeft).toBeLessThanOrEqual(GRACE * 1000);
    expect(await main.secrets.signingSecrets('routes')).toEqual([second.body.secret, first.body.secret]);
  });

  it("when a caller lists a job's deliveries, then its own job answers them oldest first and another account's job is 404", async () => {
    await main.stores.jobs.create({ id: 'job-routes', account: 'acme' } as JobRecord);
    const record = (attempt: number): DeliveryRecord => ({
      id: 'msg_1',
      event_type: 'upload-key.succeeded',
      url: 'https://hooks.example.com/',
      attempt,
      at: new Date().toISOString(),
      status_code: 500,
      latency_ms: 3,
      outcome: 'failed',
      error: 'http_500',
      next_attempt_at: null,
    });
    await main.deliveries.append('job-routes', record(1));
    await main.deliveries.append('job-routes', record(2));

    const own = await call('GET', '/api/v1/jobs/job-routes/deliveries', 'acme');
    expect(own.status).toBe(200);
    expect(own.body.deliveries.map((d: DeliveryRecord) => d.attempt)).toEqual([1, 2]);

    const other = await call('GET', '/api/v1/jobs/job-routes/deliveries', 'intruder');
    expect(other.status).toBe(404);
    expect(other.headers.get('content-type')).toMatch(/^application\/problem\+json/);
    expect((await call('GET', '/api/v1/jobs/nope/deliveries', 'acme')).status).toBe(404);
  });

  it("when a caller lists a batch's deliveries, then only the batch's account sees them", async () => {
    expect(await call('GET', '/api/v1/batches/batch-1/deliveries', 'acme')).toMatchObject({ status: 200, body: { deliveries: [] } });
    expect((await call('GET', '/api/v1/batches/batch-1/deliveries', 'intruder')).status).toBe(404);
    expect((await call('GET', '/api/v1/batches/nope/deliveries', 'acme')).status).toBe(404);
  });

  it('when a URL answered 410, then its account lists it; once cleared, later events are delivered to it again', async () => {
    receiver.answer('/back', { status: 410 });
    const first = event('/back');
    await enqueueWebhook(main.queue, first);
    expect((await waitForDeliveries(main, first.ownerId, settled)).map((d) => d.outcome)).toEqual(['gone']);
    const gone = receiver.url('/back');
    const listed = await call('GET', '/api/v1/webhooks/gone', 'acme');
    expect(listed).toMatchObject({ status: 200, body: { urls: expect.arrayContaining([gone]) } });
    expect(listed.headers.get('cache-control')).toBe('no-store');
    expect(await call('GET', '/api/v1/webhooks/gone', 'intruder')).toMatchObject({ status: 200, body: { urls: [] } });

    const clear = (account: string, u?: string) => call('DELETE', `/api/v1/webhooks/gone${u === undefined ? '' : `?url=${encodeURIComponent(u)}`}`, account);
    expect((await clear('intruder', gone)).status).toBe(404); // another account's list is its own
    const missing = await clear('acme');
    expect([missing.status, missing.body.errors]).toEqual([400, [{ path: 'url', message: expect.any(String) }]]);
    const twice = await call('DELETE', `/api/v1/webhooks/gone?url=${encodeURIComponent(gone)}&url=${encodeURIComponent(gone)}`, 'acme');
    expect(twice.status).toBe(400);
    expect((await clear('acme', gone)).status).toBe(204);
    expect((await clear('acme', gone)).status).toBe(404);
    expect((await call('GET', '/api/v1/webhooks/gone', 'acme')).body.urls).not.toContain(gone);

    const later = event('/back');
    await enqueueWebhook(main.queue, later);
    expect((await waitForDeliveries(main, later.ownerId, settled)).map((d) => [d.outcome, d.status_code])).toEqual([['delivered', 200]]);
    expect(receiver.at('/back')).toHaveLength(2);
  });

  it('when one gone URL answered 410 over 30 days ago and another since, then only the older is forgotten', async () => {
    const gone = new GoneUrls(redis, main.stores.keys);
    const [old, recent] = ['https://old.example/hook', 'https://recent.example/hook'];
    await gone.add('aging', old);
    await gone.add('aging', recent);
    // 30 days on for the older one, as its score says: its own last 410 was that long ago.
    await redis.zadd(main.stores.keys.webhookGone('aging'), Date.now() - 1, old);
    expect([await gone.has('aging', old), await gone.has('aging', recent)]).toEqual([false, true]);
    expect(await gone.list('aging')).toEqual([recent]);
    // Clearing a forgotten one says it was not listed, as GET says.
    expect(await gone.remove('aging', old)).toBe(false);
    // The next 410 drops the forgotten one from Redis.
    await gone.add('aging', 'https://third.example/hook');
    expect((await redis.zrange(main.stores.keys.webhookGone('aging'), 0, -1)).sort()).toEqual([recent, 'https://third.example/hook']);
  });

  it('when there is no bearer token, then 401', async () => {
    expect((await call('POST', '/api/v1/webhooks/secret')).status).toBe(401);
    expect((await call('GET', '/api/v1/webhooks/gone')).status).toBe(401);
  });
});

describe('secrets at rest', () => {
  it('when secrets were issued and used, then neither Redis nor the logs ever hold one in clear', async () => {
    expect(issued.length).toBeGreaterThan(5);
    const values = (await Promise.all(setups.map((s) => redisValuesUnder(redis, s.config.KEYFERRY_PREFIX)))).flat();
    expect(values.some((v) => v.startsWith('kf1.'))).toBe(true); // the sealed secrets are there
    const logText = logs.lines.join('\n');
    for (const secret of issued) {
      const key = secret.slice('whsec_'.length);
      expect(values.filter((v) => v.includes(key))).toEqual([]);
      expect(logText).not.toContain(key);
    }
    expect(logText).not.toMatch(/v1,[A-Za-z0-9+/]{43}=/);
  });
});
