/**
 * ioredis sends the commands Redis did not answer once more after it reconnects (autoResendUnfulfilledCommands),
 * and Redis may have run them before the connection dropped. These tests put a TCP proxy between ioredis and the
 * real Redis that lets one script call through, then drops the connection before its answer comes back, so the
 * same call runs twice in Redis; each of keyferry's non-idempotent scripts must count it once.
 */
import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import net, { type AddressInfo, type Socket } from 'node:net';
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { BatchRecord } from '../shared/batches.js';
import { loadConfig } from '../shared/config.js';
import { sha256Hex } from '../shared/crypto.js';
import { createStores, type Stores } from '../shared/context.js';
import { newJobRecord } from '../shared/jobs.js';
import { createUploadQueue, type UploadQueue } from '../shared/queues.js';
import { Intake } from '../api/intake.js';
import { createRedis, type RedisClient } from '../shared/redis.js';
import type { KmsConnection } from '../shared/resources.js';
import { parseUploadKey } from '../shared/schemas/upload-key.js';
import { newResourceStamp } from '../shared/stores/resource-store.js';
import { deleteKeyspace } from '../shared/stores/keyspace.js';
import { WebhookSecretStore } from '../shared/stores/webhook-secret-store.js';
import { testEnv } from './helpers/stack.js';

const request = parseUploadKey(JSON.parse(readFileSync(new URL('./fixtures/spec-example-request.json', import.meta.url), 'utf8')));

/** A proxy to Redis that, once armed, drops the connection carrying the next command that names a marker right after Redis answers it. */
class AnswerDroppingProxy {
  readonly #server: net.Server;
  readonly #sockets = new Set<Socket>();
  #marker: { text: string; command: RegExp } | undefined;
  /** Script calls whose answers were dropped. */
  dropped = 0;

  constructor(upstream: { host: string; port: number }) {
    this.#server = net.createServer((client) => {
      const server = net.connect(upstream);
      this.#sockets.add(client).add(server);
      let dropNextAnswer = false;
      const closeBoth = () => {
        client.destroy();
        server.destroy();
      };
      client.on('data', (chunk) => {
        const text = chunk.toString('latin1');
        if (this.#marker !== undefined && this.#marker.command.test(text) && text.includes(this.#marker.text)) {
          this.#marker = undefined;
          dropNextAnswer = true;
        }
        server.write(chunk);
      });
      server.on('data', (chunk) => {
        if (!dropNextAnswer) return void client.write(chunk);
        this.dropped++;
        closeBoth(); // Redis ran the call; its answer never reaches ioredis
      });
      client.on('error', closeBoth).on('close', closeBoth);
      server.on('error', closeBoth).on('close', closeBoth);
    });
  }

  async listen(): Promise<number> {
    await new Promise<void>((resolve) => this.#server.listen(0, '127.0.0.1', resolve));
    return (this.#server.address() as AddressInfo).port;
  }

  /** The next `command` (default: a script call, EVAL or EVALSHA) whose arguments contain `text` loses its answer. */
  dropAnswerTo(text: string, command = /eval/i): void {
    this.#marker = { text, command };
  }

  async close(): Promise<void> {
    for (const s of this.#sockets) s.destroy();
    await new Promise<void>((resolve) => this.#server.close(() => resolve()));
  }
}

const env = testEnv('resend');
const upstream = new URL(env.REDIS_URL as string);
const proxy = new AnswerDroppingProxy({ host: upstream.hostname, port: Number(upstream.port || 6379) });
let viaProxy: RedisClient;
/** As the API's connection: fails fast while Redis is away, but also sends unanswered commands again. */
let apiViaProxy: RedisClient;
let queue: UploadQueue | undefined;
let direct: Redis;
let stores: Stores;
let config: ReturnType<typeof loadConfig>;

beforeAll(async () => {
  const port = await proxy.listen();
  config = loadConfig({ ...env, REDIS_URL: `redis://127.0.0.1:${port}` });
  // As a worker's connection: commands wait for the reconnect (maxRetriesPerRequest null), then go again.
  viaProxy = createRedis(config);
  viaProxy.on('error', () => undefined); // the dropped connections are on purpose
  direct = new Redis(env.REDIS_URL as string);
  stores = createStores(config, viaProxy);
  apiViaProxy = createRedis(config, { failFast: true });
  apiViaProxy.on('error', () => undefined);
});
afterAll(async () => {
  await queue?.close();
  apiViaProxy?.disconnect();
  viaProxy?.disconnect();
  await proxy.close();
  if (direct) {
    await deleteKeyspace(direct, config.KEYFERRY_PREFIX);
    direct.disconnect();
  }
});

describe('a script call that Redis ran but whose answer was lost is sent again by ioredis', () => {
  it('when the compare-and-set that starts a job runs twice, then the job starts (not "changed before it started") with one event', async () => {
    const job = newJobRecord({ id: randomUUID(), account: 'acme', request, kmsId: 'kms-1', maxAttempts: 5 });
    await stores.jobs.create(job);
    const held = await stores.jobs.getHeld(job.id);
    proxy.dropAnswerTo(job.id);
    const before = proxy.dropped;
    const started = await stores.jobs.updateHeld(held!, (j) => void (j.status = 'running'), 'queued');
    expect(proxy.dropped).toBe(before + 1);
    expect(started?.job.status).toBe('running');
    expect((await stores.jobs.get(job.id))?.status).toBe('running');
    expect(await direct.xlen(stores.keys.jobEvents(job.id))).toBe(1);
  });

  it("when a batch job's final write runs twice, then the batch counts it once and the caller still learns it completed the batch", async () => {
    const batchId = randomUUID();
    const now = new Date().toISOString();
    const batch: BatchRecord = { id: batchId, account: 'acme', status: 'running', total: 2, created_at: now, updated_at: now, finished_at: null, callback_url: null, enqueued: 1, completions: 0 };
    const jobs = [0, 1].map((index) => newJobRecord({ id: `${batchId}.${index}`, account: 'acme', request, kmsId: 'kms-1', maxAttempts: 5, batch: { id: batchId, index } }));
    await stores.batches.create(batch, jobs);
    await stores.jobs.update(`${batchId}.0`, (j) => void (j.status = 'succeeded'));

    proxy.dropAnswerTo(`${batchId}.1`);
    const before = proxy.dropped;
    const last = await stores.jobs.update(`${batchId}.1`, (j) => void (j.status = 'succeeded'));
    expect(proxy.dropped).toBe(before + 1);
    expect(last.batchCompletion).toBe(1);
    const found = await stores.batches.get(batchId);
    expect(found?.counts).toMatchObject({ queued: 0, succeeded: 2 });
    expect(found?.batch).toMatchObject({ status: 'completed', completions: 1 });
    expect(await direct.xlen(stores.keys.jobEvents(`${batchId}.1`))).toBe(1);
  });

  it('when creating a named resource runs twice, then it is created once and not reported as a name conflict', async () => {
    const conn = { ...newResourceStamp('acme', randomUUID(), 'kms-resend'), account_id: '123456789012', regions: ['us-east-1'] } as unknown as KmsConnection;
    proxy.dropAnswerTo(conn.id);
    const before = proxy.dropped;
    await expect(stores.kmsConnections.create(conn)).resolves.toMatchObject({ id: conn.id });
    expect(proxy.dropped).toBe(before + 1);
    expect((await stores.kmsConnections.list('acme')).map((c) => c.id)).toEqual([conn.id]);
    await expect(stores.kmsConnections.create({ ...conn, id: randomUUID() })).rejects.toMatchObject({ status: 409 });
  });

  it('when rotating the webhook secret runs twice, then the secret it replaced stays valid for the grace period', async () => {
    const secrets = new WebhookSecretStore(viaProxy, stores.keys, stores.box);
    const first = await secrets.rotate('acme', 0);
    proxy.dropAnswerTo(stores.keys.webhookSecret('acme'));
    const before = proxy.dropped;
    const second = await secrets.rotate('acme', 3600);
    expect(proxy.dropped).toBe(before + 1);
    expect(second.previous_valid_until).not.toBeNull();
    const signing = await secrets.signingSecrets('acme');
    expect(signing).toEqual(expect.arrayContaining([first.secret, second.secret]));
  });

  it('when the SET NX that claims an Idempotency-Key runs twice, then the upload is accepted (not "in flight" for good) and a retry replays it', async () => {
    const apiStores = createStores(config, apiViaProxy);
    queue = createUploadQueue(apiViaProxy, apiStores.keys);
    const intake = new Intake(config, apiViaProxy, apiStores, queue);
    await apiStores.kmsConnections.create({ ...newResourceStamp('acme', randomUUID(), 'kms'), account_id: '123456789012', regions: ['ap-south-1'] } as unknown as KmsConnection);
    const body = { source_key_identifier: 'test-key', region: 'ap-south-1', kms: 'kms', aws_param: { Alias: 'resend-1' } };
    const key = `idem-${randomUUID()}`;
    proxy.dropAnswerTo(apiStores.keys.idempotency('acme', sha256Hex(key)), /set/i);
    const before = proxy.dropped;
    const first = await intake.submitUpload('acme', body, key);
    expect(proxy.dropped).toBe(before + 1);
    expect(first.replayed).toBe(false);
    expect((await apiStores.jobs.get(first.job.id))?.status).toBe('queued');
    expect(await queue.getJobState(first.job.id)).toBe('waiting');
    const again = await intake.submitUpload('acme', body, key);
    expect(again).toMatchObject({ replayed: true, job: { id: first.job.id } });
  });
});
