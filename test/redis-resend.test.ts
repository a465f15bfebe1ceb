/**
 * ioredis sends the commands Redis did not answer once more after it reconnects (autoResendUnfulfilledCommands),
 * and Redis may have run them before the connection dropped. These tests put a TCP proxy between ioredis and the
 * real Redis that lets one call through, then drops the connection before its answer comes back, so the same
 * call runs twice in Redis; each of keyferry's non-idempotent writes must count it once. When the client gives
 * up instead (Redis away past its retries), the write ran once and the caller saw an error.
 */
import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import net, { type AddressInfo, type Socket } from 'node:net';
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import type { BatchRecord } from '../shared/batches.js';
import { loadConfig } from '../shared/config.js';
import { canonicalJson, sha256Hex } from '../shared/crypto.js';
import { createStores, type Stores } from '../shared/context.js';
import { newJobRecord } from '../shared/jobs.js';
import { createUploadQueue, type UploadQueue } from '../shared/queues.js';
import { Idempotency } from '../api/idempotency.js';
import { Intake, undoBatch, undoSubmission } from '../api/intake.js';
import { createRedis, type RedisClient } from '../shared/redis.js';
import type { KmsConnection } from '../shared/resources.js';
import { parseUploadKey } from '../shared/schemas/upload-key.js';
import { newResourceStamp } from '../shared/stores/resource-store.js';
import { JobTakenOver } from '../shared/stores/job-store.js';
import { deleteKeyspace } from '../shared/stores/keyspace.js';
import { WebhookSecretStore } from '../shared/stores/webhook-secret-store.js';
import { testEnv } from './helpers/stack.js';

const request = parseUploadKey(JSON.parse(readFileSync(new URL('./fixtures/spec-example-request.json', import.meta.url), 'utf8')));

/** The name of the command a client chunk starts with (RESP: `*<n>\r\n$<len>\r\n<name>\r\n`), lower-cased. */
const commandName = (chunk: string) => /^\*\d+\r\n\$\d+\r\n([^\r]+)\r\n/.exec(chunk)?.[1]?.toLowerCase();

/**
 * A proxy to Redis that, once armed, lets the next command of the given names that mentions a marker through,
 * then drops that connection as soon as Redis answers, before the answer reaches ioredis; optionally it then
 * refuses connections for a while (an outage longer than the client's retries). Each client used through it
 * runs one command at a time (the tests await every call), so the answer that comes next is that command's.
 */
class AnswerDroppingProxy {
  readonly #server: net.Server;
  readonly #sockets = new Set<Socket>();
  #marker: { text: string; commands: string[]; outageMs: number } | undefined;
  #port = 0;
  /** Answers dropped so far. */
  dropped = 0;

  constructor(upstream: { host: string; port: number }) {
    this.#server = net.createServer((client) => {
      const server = net.connect(upstream);
      this.#sockets.add(client).add(server);
      let dropAnswer: { outageMs: number } | undefined;
      const closeBoth = () => {
        client.destroy();
        server.destroy();
      };
      client.on('data', (chunk) => {
        const text = chunk.toString('latin1');
        const marker = this.#marker;
        if (marker && marker.commands.includes(commandName(text) ?? '') && text.includes(marker.text)) {
          this.#marker = undefined;
          dropAnswer = { outageMs: marker.outageMs };
        }
        server.write(chunk);
      });
      server.on('data', (chunk) => {
        if (!dropAnswer) return void client.write(chunk);
        this.dropped++;
        closeBoth(); // Redis ran the command; its answer never reaches ioredis
        if (dropAnswer.outageMs > 0) {
          // Connections are refused until the proxy listens again on its port.
          this.#server.close();
          setTimeout(() => this.#server.listen(this.#port, '127.0.0.1'), dropAnswer.outageMs);
        }
      });
      client.on('error', closeBoth).on('close', closeBoth);
      server.on('error', closeBoth).on('close', closeBoth);
    });
  }

  /**
   * The next of `commands` (default: script calls; ioredis sends the first one on a connection as EVAL)
   * whose arguments contain `text` loses its answer, and connections are refused for `outageMs` after that.
   */
  dropAnswerTo(text: string, opts: { commands?: string[]; outageMs?: number } = {}): void {
    this.#marker = { text, commands: opts.commands ?? ['evalsha', 'eval'], outageMs: opts.outageMs ?? 0 };
  }

  async listen(): Promise<number> {
    await new Promise<void>((resolve) => this.#server.listen(0, '127.0.0.1', resolve));
    this.#port = (this.#server.address() as AddressInfo).port;
    return this.#port;
  }

  async close(): Promise<void> {
    for (const s of this.#sockets) s.destroy();
    await new Promise<void>((resolve) => (this.#server.listening ? this.#server.close(() => resolve()) : resolve()));
  }
}

const env = testEnv('resend');
const newJob = () => newJobRecord({ id: randomUUID(), account: 'acme', request, kmsId: 'kms-1', maxAttempts: 5 });

/** Runs `fn` with the answer to the next call naming `text` dropped (see AnswerDroppingProxy), and checks it was. */
async function withDroppedAnswer<T>(text: string, fn: () => Promise<T>, opts: { commands?: string[]; outageMs?: number } = {}): Promise<T> {
  const before = proxy.dropped;
  proxy.dropAnswerTo(text, opts);
  try {
    return await fn();
  } finally {
    expect(proxy.dropped).toBe(before + 1);
  }
}
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

describe('a call that Redis ran but whose answer was lost is sent again by ioredis', () => {
  it('when the compare-and-set that starts a job runs twice, then the job starts (not "changed before it started") with one event', async () => {
    const job = newJob();
    await stores.jobs.create(job);
    const held = await stores.jobs.getHeld(job.id);
    const started = await withDroppedAnswer(job.id, () => stores.jobs.updateFrom(held!, (j) => void (j.status = 'running')));
    expect(started.job.status).toBe('running');
    expect((await stores.jobs.get(job.id))?.status).toBe('running');
    expect(await direct.xlen(stores.keys.jobEvents(job.id))).toBe(1);
  });

  it('when the final write that also sets the key resource runs twice, then the job succeeded once (one event) and the resource is there', async () => {
    const job = newJob();
    await stores.jobs.create(job);
    const running = await stores.jobs.updateFrom((await stores.jobs.getHeld(job.id))!, (j) => void (j.status = 'running'));
    const alongside = { key: stores.keys.uploadedKey(randomUUID()), value: JSON.stringify({ owner: 'acme', key: { id: job.id } }) };
    const done = await withDroppedAnswer(job.id, () => stores.jobs.updateFrom(running, (j) => void (j.status = 'succeeded'), alongside));
    expect(done.job.status).toBe('succeeded');
    expect(await direct.get(alongside.key)).toBe(alongside.value);
    const events = await direct.xrange(stores.keys.jobEvents(job.id), '-', '+');
    expect(events.map(([, f]) => (JSON.parse(f[f.indexOf('data') + 1] as string) as { status: string }).status)).toEqual(['running', 'succeeded']);
  });

  it("when a new job's record SET runs twice and a worker wrote the record in between, then the worker's record stays", async () => {
    const job = newJob();
    const key = stores.keys.job(job.id);
    const created = withDroppedAnswer(key, () => stores.jobs.create(job), { commands: ['set'], outageMs: 300 });
    // Redis ran the SET; while the connection is down, a worker starts the job (the intake's add went with it).
    await vi.waitFor(async () => expect(await direct.exists(key)).toBe(1), { timeout: 2000 });
    await direct.set(key, JSON.stringify({ ...job, status: 'running', attempts: 1 }));
    await created;
    expect(await stores.jobs.get(job.id)).toMatchObject({ status: 'running', attempts: 1 });
  });

  it("when a batch job's final write runs twice, then the batch counts it once and the caller still learns it completed the batch", async () => {
    const batchId = randomUUID();
    const now = new Date().toISOString();
    const batch: BatchRecord = { id: batchId, account: 'acme', status: 'running', total: 2, created_at: now, updated_at: now, finished_at: null, callback_url: null, enqueued: 1, completions: 0 };
    const jobs = [0, 1].map((index) => newJobRecord({ id: `${batchId}.${index}`, account: 'acme', request, kmsId: 'kms-1', maxAttempts: 5, batch: { id: batchId, index } }));
    await stores.batches.create(batch, jobs);
    const finish = async (id: string) => stores.jobs.updateFrom((await stores.jobs.getHeld(id))!, (j) => void (j.status = 'succeeded'));
    const first = await withDroppedAnswer(`${batchId}.0`, () => finish(`${batchId}.0`));
    expect(first.batchCompletion).toBe(0);
    expect((await stores.batches.get(batchId))?.counts).toMatchObject({ queued: 1, succeeded: 1 });

    const last = await withDroppedAnswer(`${batchId}.1`, () => finish(`${batchId}.1`));
    expect(last.batchCompletion).toBe(1);
    const found = await stores.batches.get(batchId);
    expect(found?.counts).toMatchObject({ queued: 0, succeeded: 2 });
    expect(found?.batch).toMatchObject({ status: 'completed', completions: 1 });
    expect(await direct.xlen(stores.keys.jobEvents(`${batchId}.1`))).toBe(1);
  });

  it('when creating a named resource runs twice, then it is created once and not reported as a name conflict', async () => {
    const conn = { ...newResourceStamp('acme', randomUUID(), 'kms-resend'), account_id: '123456789012', regions: ['us-east-1'] } as unknown as KmsConnection;
    await expect(withDroppedAnswer(conn.id, () => stores.kmsConnections.create(conn))).resolves.toMatchObject({ id: conn.id });
    expect((await stores.kmsConnections.list('acme')).map((c) => c.id)).toEqual([conn.id]);
    await expect(stores.kmsConnections.create({ ...conn, id: randomUUID() })).rejects.toMatchObject({ status: 409 });
  });

  it('when rotating the webhook secret runs twice, then the secret it replaced stays valid for the grace period', async () => {
    const secrets = new WebhookSecretStore(viaProxy, stores.keys, stores.box);
    const first = await secrets.rotate('acme', 0);
    const second = await withDroppedAnswer(stores.keys.webhookSecret('acme'), () => secrets.rotate('acme', 3600));
    expect(second.previous_valid_until).not.toBeNull();
    const signing = await secrets.signingSecrets('acme');
    expect(signing).toEqual(expect.arrayContaining([first.secret, second.secret]));
  });
});

describe('two writers, one compare-and-set', () => {
  it("when another worker started the job after a run last wrote it, then the run's next write throws JobTakenOver and writes neither the record nor the key alongside", async () => {
    const job = newJob();
    await stores.jobs.create(job);
    const run = await stores.jobs.updateFrom((await stores.jobs.getHeld(job.id))!, (j) => void (j.status = 'running'));
    // The run's lock expired; another worker took the job up from the record as the run left it.
    const taker = await stores.jobs.updateFrom((await stores.jobs.getHeld(job.id))!, (j) => void (j.attempts = 2));
    const alongside = { key: stores.keys.uploadedKey(randomUUID()), value: '{"owner":"acme"}' };
    await expect(stores.jobs.updateFrom(run, (j) => void (j.status = 'succeeded'), alongside)).rejects.toBeInstanceOf(JobTakenOver);
    await expect(stores.jobs.updateFrom(run, (j) => void (j.progress.kms_key_id = 'key-1'))).rejects.toBeInstanceOf(JobTakenOver);
    expect(await direct.exists(alongside.key)).toBe(0);
    expect(await stores.jobs.get(job.id)).toEqual(taker.job);
    // The taker's own next write goes through.
    expect((await stores.jobs.updateFrom(taker, (j) => void (j.step = 'resolve'))).job).toMatchObject({ status: 'running', attempts: 2, step: 'resolve' });
  });

  it('when the record is gone, then a write from the held record throws JobTakenOver and creates nothing', async () => {
    const job = newJob();
    await stores.jobs.create(job);
    const held = await stores.jobs.getHeld(job.id);
    await stores.jobs.delete(job.id);
    await expect(stores.jobs.updateFrom(held!, (j) => void (j.status = 'running'))).rejects.toBeInstanceOf(JobTakenOver);
    expect(await direct.exists(stores.keys.job(job.id))).toBe(0);
  });

  it('when a held record without a write_id has the stored status still, then updateFrom writes it; once the status moved, it throws JobTakenOver', async () => {
    const { write_id: _none, ...legacy } = newJob();
    await direct.set(stores.keys.job(legacy.id), JSON.stringify(legacy));
    const held = await stores.jobs.getHeld(legacy.id);
    expect((await stores.jobs.updateFrom(held!, (j) => void (j.attempts = 1))).job).toMatchObject({ status: 'queued', attempts: 1, write_id: expect.any(String) });
    await direct.set(stores.keys.job(legacy.id), JSON.stringify({ ...legacy, status: 'canceled' }));
    await expect(stores.jobs.updateFrom(held!, (j) => void (j.status = 'running'))).rejects.toBeInstanceOf(JobTakenOver);
    expect((await stores.jobs.get(legacy.id))?.status).toBe('canceled');
  });

  it('when a write from a held record changes its status and progress, then the held record itself stays as it was', async () => {
    const job = newJob();
    await stores.jobs.create(job);
    const held = await stores.jobs.getHeld(job.id);
    const before = structuredClone(held!.job);
    const done = await stores.jobs.updateFrom(held!, (j) => {
      j.status = 'running';
      j.progress.kms_key_id = 'key-1';
    });
    expect(done.job).toMatchObject({ status: 'running', progress: { kms_key_id: 'key-1' } });
    expect(done.job.progress).not.toBe(held!.job.progress);
    expect(held!.job).toEqual(before);
    expect(held!.job.status).toBe('queued');
    expect(held!.job.progress.kms_key_id).toBeUndefined();
  });

  it("when the other writer's record quotes the held write_id in a field, then a write from the held record is still refused", async () => {
    const job = newJob();
    await stores.jobs.create(job);
    const held = await stores.jobs.getHeld(job.id);
    const quoted = JSON.stringify({ write_id: held!.job.write_id }).slice(1, -1);
    await stores.jobs.updateIf(job.id, undefined, (j) => void (j.error = { code: 'x', message: quoted, retryable: true }));
    await expect(stores.jobs.updateFrom(held!, (j) => void (j.step = 'resolve'))).rejects.toBeInstanceOf(JobTakenOver);
    expect(await stores.jobs.get(job.id)).toMatchObject({ step: null, error: { message: quoted } });
  });

  it('when two writers make the same change in the same millisecond, then only one of them wins', async () => {
    const job = newJob();
    await stores.jobs.create(job);
    vi.useFakeTimers({ toFake: ['Date'], now: Date.now() }); // every write stamps the same updated_at
    try {
      const both = await Promise.all([1, 2].map(() => stores.jobs.updateIf(job.id, 'queued', (j) => void (j.status = 'canceled'))));
      expect(both.filter((won) => won !== undefined)).toHaveLength(1);
    } finally {
      vi.useRealTimers();
    }
  });
});

describe('Idempotency-Key claims when Redis loses an answer', () => {
  const STALE_CLAIM_MS = 500;
  let apiStores: Stores;
  let intake: Intake;
  const body = (alias: string) => ({ source_key_identifier: 'test-key', region: 'ap-south-1', kms: 'kms', aws_param: { Alias: alias } });
  const claimKey = (key: string) => apiStores.keys.idempotency('acme', sha256Hex(key));

  beforeAll(async () => {
    apiStores = createStores(config, apiViaProxy);
    // BullMQ on a connection of its own, so that the proxied one carries only the calls under test.
    queue = createUploadQueue(direct, apiStores.keys);
    intake = new Intake(config, apiViaProxy, apiStores, queue, STALE_CLAIM_MS);
    await apiStores.kmsConnections.create({ ...newResourceStamp('acme', randomUUID(), 'kms'), account_id: '123456789012', regions: ['ap-south-1'] } as unknown as KmsConnection);
  });

  it('when the SET NX that claims a key runs twice, then the upload is accepted (not "in flight" for good) and a retry replays it', async () => {
    const key = `idem-${randomUUID()}`;
    const first = await withDroppedAnswer(claimKey(key), () => intake.submitUpload('acme', body('resend-1'), key), { commands: ['set'] });
    expect(first.replayed).toBe(false);
    expect((await apiStores.jobs.get(first.job.id))?.status).toBe('queued');
    expect(await queue!.getJobState(first.job.id)).toBe('waiting');
    const again = await intake.submitUpload('acme', body('resend-1'), key);
    expect(again).toMatchObject({ replayed: true, job: { id: first.job.id } });
  });

  it("when Redis stays away past the client's retries after running the claim, then the request fails, and a retry once the claim is stale is accepted and replayed after", async () => {
    const key = `idem-${randomUUID()}`;
    await expect(withDroppedAnswer(claimKey(key), () => intake.submitUpload('acme', body('outage-1'), key), { commands: ['set'], outageMs: 400 })).rejects.toThrow();
    const left = JSON.parse((await direct.get(claimKey(key))) as string) as { id: string };
    expect(await direct.exists(apiStores.keys.job(left.id))).toBe(0); // a claim without a record

    await new Promise((r) => setTimeout(r, STALE_CLAIM_MS + 100));
    const retried = await intake.submitUpload('acme', body('outage-1'), key);
    expect(retried.replayed).toBe(false);
    expect(retried.job.id).not.toBe(left.id);
    expect(await queue!.getJobState(retried.job.id)).toBe('waiting');
    expect(await intake.submitUpload('acme', body('outage-1'), key)).toMatchObject({ replayed: true, job: { id: retried.job.id } });
  });

  it("when a claim without a record was written by an API process whose clock runs an hour ahead, then it still goes stale by Redis's clock", async () => {
    const key = `idem-${randomUUID()}`;
    const req = parseUploadKey(body('skew-1'));
    const left = { fingerprint: sha256Hex(canonicalJson(req)), id: randomUUID(), at: Date.now() + 3_600_000 };
    await direct.set(claimKey(key), JSON.stringify(left), 'EX', 86_400);
    await new Promise((r) => setTimeout(r, STALE_CLAIM_MS + 100));
    const retried = await intake.submitUpload('acme', body('skew-1'), key);
    expect(retried.replayed).toBe(false);
    expect(retried.job.id).not.toBe(left.id);
  });

  it('when a replayed upload is recorded but was never enqueued, then the replay enqueues it', async () => {
    const key = `idem-${randomUUID()}`;
    const first = await intake.submitUpload('acme', body('enqueue-1'), key);
    await queue!.remove(first.job.id); // as if the first request's add had failed after its record was written
    expect(await queue!.getJobState(first.job.id)).toBe('unknown');
    expect(await intake.submitUpload('acme', body('enqueue-1'), key)).toMatchObject({ replayed: true, job: { id: first.job.id } });
    expect(await queue!.getJobState(first.job.id)).toBe('waiting');
  });
});

describe("Idempotency-Key: a replay and the first request's undo", () => {
  const STALE_CLAIM_MS = 500;
  let apiStores: Stores;
  let intake: Intake;
  let idempotency: Idempotency;
  const body = (alias: string) => ({ source_key_identifier: 'test-key', region: 'ap-south-1', kms: 'kms', aws_param: { Alias: alias } });
  const storedClaim = async (key: string) => JSON.parse((await direct.get(apiStores.keys.idempotency('acme', sha256Hex(key)))) ?? 'null') as { id: string; state?: string } | null;

  beforeAll(async () => {
    apiStores = createStores(config, direct);
    queue ??= createUploadQueue(direct, apiStores.keys);
    intake = new Intake(config, direct, apiStores, queue, STALE_CLAIM_MS);
    idempotency = new Idempotency(direct, apiStores.keys, STALE_CLAIM_MS);
    if (!(await apiStores.kmsConnections.find('acme', 'kms'))) {
      await apiStores.kmsConnections.create({ ...newResourceStamp('acme', randomUUID(), 'kms'), account_id: '123456789012', regions: ['ap-south-1'] } as unknown as KmsConnection);
    }
  });

  const add = async (id: string) => void (await queue!.add('upload-key', { jobId: id, account: 'acme' }, { jobId: id }));
  /** The queue as the intake hands it to the undo. */
  const undoQueue = (id: string) => ({ remove: (jobId: string) => queue!.remove(jobId), enqueue: () => add(id) });

  /** What the first request with `key` leaves when its add failed: its claim and its record, no BullMQ job. */
  const firstRequest = async (key: string, alias: string) => {
    const req = parseUploadKey(body(alias));
    const id = randomUUID();
    const { claim } = await idempotency.claim('acme', key, req, id, async () => undefined);
    await apiStores.jobs.create(newJobRecord({ id, account: 'acme', request: req, kmsId: 'kms', maxAttempts: 1 }));
    return { id, claim };
  };

  it('when a replay re-enqueued the job before the first request undoes its failed add, then the undo leaves the record and the job', async () => {
    const key = `idem-${randomUUID()}`;
    const first = await firstRequest(key, 'adopted-1');
    const replay = await intake.submitUpload('acme', body('adopted-1'), key);
    expect(replay).toMatchObject({ replayed: true, job: { id: first.id } });
    expect(await storedClaim(key)).toMatchObject({ id: first.id, state: 'adopted' });

    await undoSubmission(undoQueue(first.id), apiStores.jobs, first.id, first.claim);
    expect(await apiStores.jobs.get(first.id)).toMatchObject({ status: 'queued' });
    expect(await queue!.getJobState(first.id)).toBe('waiting');
    expect(await storedClaim(key)).toMatchObject({ id: first.id, state: 'adopted' });
  });

  it('when the first request began undoing before a replay came, then the replay waits for the undo and is accepted as a new upload', async () => {
    const key = `idem-${randomUUID()}`;
    const first = await firstRequest(key, 'undone-1');
    expect(await first.claim.beginUndo()).toBe(true);
    let settled = false;
    const replay = intake.submitUpload('acme', body('undone-1'), key).finally(() => (settled = true));
    await new Promise((r) => setTimeout(r, 200));
    expect(settled).toBe(false); // it waits: no 202 for the job being undone

    await undoSubmission(undoQueue(first.id), apiStores.jobs, first.id, first.claim);
    const accepted = await replay;
    expect(accepted.replayed).toBe(false);
    expect(accepted.job.id).not.toBe(first.id);
    expect(await apiStores.jobs.get(first.id)).toBeUndefined();
    expect(await queue!.getJobState(accepted.job.id)).toBe('waiting');
    expect(await storedClaim(key)).toMatchObject({ id: accepted.job.id });
  });

  it('when the undo stalls past the stale-claim age and a replay adopts the job meanwhile, then the undo puts the job back instead of deleting it', async () => {
    const key = `idem-${randomUUID()}`;
    const first = await firstRequest(key, 'stalled-1');
    let replay: Awaited<ReturnType<Intake['submitUpload']>> | undefined;
    const stalling = {
      // The undo's process stops before its remove; a replay comes once the claim is stale, then the remove runs.
      remove: async (id: string) => {
        await new Promise((r) => setTimeout(r, STALE_CLAIM_MS + 100));
        replay = await intake.submitUpload('acme', body('stalled-1'), key);
        return queue!.remove(id);
      },
      enqueue: () => add(first.id),
    };
    await undoSubmission(stalling, apiStores.jobs, first.id, first.claim);
    expect(replay).toMatchObject({ replayed: true, job: { id: first.id } });
    expect(await apiStores.jobs.get(first.id)).toMatchObject({ status: 'queued' });
    expect(await queue!.getJobState(first.id)).toBe('waiting');
    expect(await storedClaim(key)).toMatchObject({ id: first.id, state: 'adopted' });
  });

  it('when another request took the stale key over before the first request undoes its job, then the undo takes back its own job and leaves the claim', async () => {
    const key = `idem-${randomUUID()}`;
    const req = parseUploadKey(body('taken-1'));
    const firstId = randomUUID();
    const { claim } = await idempotency.claim('acme', key, req, firstId, async () => undefined);
    await new Promise((r) => setTimeout(r, STALE_CLAIM_MS + 100));
    const second = await intake.submitUpload('acme', body('taken-1'), key); // the claim is stale and has no record
    expect(second.job.id).not.toBe(firstId);
    // The first request's record and add land late, and their answers are lost.
    await apiStores.jobs.create(newJobRecord({ id: firstId, account: 'acme', request: req, kmsId: 'kms', maxAttempts: 1 }));
    await add(firstId);
    await undoSubmission(undoQueue(firstId), apiStores.jobs, firstId, claim);
    expect(await apiStores.jobs.get(firstId)).toBeUndefined();
    expect(await queue!.getJobState(firstId)).toBe('unknown');
    expect(await storedClaim(key)).toMatchObject({ id: second.job.id });
    expect((await storedClaim(key))?.state).toBeUndefined();
    expect(await queue!.getJobState(second.job.id)).toBe('waiting');
  });

  it('when a replay re-enqueued a batch before the first request undoes its failed addBulk, then the undo leaves the batch', async () => {
    const key = `idem-${randomUUID()}`;
    const items = [body('batch-adopted-1'), body('batch-adopted-2')];
    const batchId = randomUUID();
    const { claim } = await idempotency.claim('acme', key, { items: items.map((i) => parseUploadKey(i)), callback_url: undefined }, batchId, async () => undefined);
    const now = new Date().toISOString();
    const batch: BatchRecord = { id: batchId, account: 'acme', status: 'running', total: 2, created_at: now, updated_at: now, finished_at: null, callback_url: null, enqueued: 0, completions: 0 };
    await apiStores.batches.create(batch, items.map((i, index) => newJobRecord({ id: `${batchId}.${index}`, account: 'acme', request: parseUploadKey(i), kmsId: 'kms', maxAttempts: 1, batch: { id: batchId, index } })));
    expect(await intake.submitBatch('acme', { items }, key)).toEqual({ batchId, replayed: true });
    expect(await storedClaim(key)).toMatchObject({ id: batchId, state: 'adopted' });

    await undoBatch(apiStores.batches, batchId, 2, claim, { remove: (id) => queue!.remove(id), enqueue: async () => undefined });
    expect(await apiStores.batches.get(batchId)).toMatchObject({ batch: { enqueued: 1 }, counts: { queued: 2 } });
    expect(await queue!.getJobState(`${batchId}.0`)).toBe('prioritized');
    expect(await queue!.getJobState(`${batchId}.1`)).toBe('prioritized');
  });

  it('when an undo never finished (its request died) and its record stays, then once the claim is stale a replay enqueues that record', async () => {
    const key = `idem-${randomUUID()}`;
    const first = await firstRequest(key, 'stale-undo-1');
    await first.claim.beginUndo();
    await new Promise((r) => setTimeout(r, STALE_CLAIM_MS + 100));
    expect(await intake.submitUpload('acme', body('stale-undo-1'), key)).toMatchObject({ replayed: true, job: { id: first.id } });
    expect(await queue!.getJobState(first.id)).toBe('waiting');
    await first.claim.release(); // the late request can no longer free the claim
    expect(await storedClaim(key)).toMatchObject({ id: first.id, state: 'adopted' });
  });
});
