import { randomUUID } from 'node:crypto';
import type { Job } from 'bullmq';
import { Cluster } from 'ioredis';
import { BATCH_PRIORITY, batchBodySchema, type BatchRecord } from '../shared/batches.js';
import type { Config } from '../shared/config.js';
import type { Stores } from '../shared/context.js';
import { canonicalJson, sha256Hex } from '../shared/crypto.js';
import { AppError, UnprocessableError, ValidationError, type FieldError } from '../shared/errors.js';
import { newJobRecord, type JobRecord, type UploadJobData } from '../shared/jobs.js';
import { jobsAccepted } from '../shared/metrics.js';
import { uploadJobOptions, type UploadQueue } from '../shared/queues.js';
import { defineScript, type RedisClient, type RedisScript } from '../shared/redis.js';
import { parseUploadKey, type UploadKeyRequest } from '../shared/schemas/upload-key.js';
import { checkWebhookUrl } from '../shared/ssrf.js';
import type { JobStore } from '../shared/stores/job-store.js';
import { parseOrThrow } from '../shared/validation.js';

const IDEMPOTENCY_TTL_SECONDS = 86_400;
/** A claim older than this whose record does not exist was left by a request that failed (claimIdempotency). */
const STALE_CLAIM_MS = 30_000;
/** Replaces the claim ARGV[1] by ARGV[2] (with a fresh TTL of ARGV[3] s) only if it is still ARGV[1]. */
const TAKE_OVER_CLAIM = `
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1`;
/** Deletes the claim only if it is still ARGV[1] (a request that failed late must not free a claim taken over). */
const RELEASE_CLAIM = `
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])`;
const IDEMPOTENCY_KEY_RE = /^[\x21-\x7e]{1,255}$/;
/** A 400 for a huge batch lists this many errors at most (the rest are counted). */
const MAX_REPORTED_ERRORS = 1000;

export interface Submission {
  job: JobRecord;
  bullJob: Job<UploadJobData> | undefined;
  replayed: boolean;
}

export interface BatchSubmission {
  batchId: string;
  replayed: boolean;
}

/** Validates, authorises against the account's resources, records and enqueues upload jobs and batches. */
export class Intake {
  readonly #takeOverClaim: RedisScript;
  readonly #releaseClaim: RedisScript;
  /** Whether a new job's record and its add go out together (recordAndEnqueue): one Redis, one client for both. */
  readonly #recordWithAdd: boolean;

  constructor(
    private readonly config: Config,
    private readonly redis: RedisClient,
    private readonly stores: Stores,
    private readonly queue: UploadQueue,
    /** How old a claim without a record must be before a retry takes it over (see claimIdempotency). */
    private readonly staleClaimMs = STALE_CLAIM_MS,
  ) {
    this.#takeOverClaim = defineScript(redis, 'idempotency_take_over', TAKE_OVER_CLAIM);
    this.#releaseClaim = defineScript(redis, 'idempotency_release', RELEASE_CLAIM);
    this.#recordWithAdd = !(redis instanceof Cluster) && queue.opts.connection === redis;
  }

  async submitUpload(account: string, body: unknown, idempotencyKey: string | undefined): Promise<Submission> {
    checkIdempotencyKey(idempotencyKey);
    const req = parseUploadKey(body);
    this.checkCallbackUrls([[req.callback_url, 'callback_url']]);
    const [kmsId] = await this.resolveReferences(account, [req], (_i, path) => path);
    const id = randomUUID();

    const load = (jobId: string) => this.stores.jobs.getOwned(account, jobId);
    const claim = await this.claimIdempotency(account, idempotencyKey, req, id, load);
    if (claim.priorId) {
      const job = await this.waitForRecord(() => load(claim.priorId as string));
      // The first request may have recorded its job and then failed to enqueue it (and to clean up, with Redis
      // away): a replay enqueues a still-queued job again. BullMQ ignores a job id it already has.
      if (job.status === 'queued') await this.queue.add('upload-key', { jobId: job.id, account }, { ...uploadJobOptions(this.config), jobId: job.id });
      return { job, bullJob: undefined, replayed: true };
    }
    const job = newJobRecord({ id, account, request: req, kmsId: kmsId as string, maxAttempts: this.config.JOB_ATTEMPTS });
    try {
      const bullJob = await this.recordAndEnqueue(job);
      jobsAccepted.inc({ kind: 'single' });
      return { job, bullJob, replayed: false };
    } catch (err) {
      await undoSubmission(this.queue, this.stores.jobs, id, claim.release).catch(() => undefined);
      throw err;
    }
  }

  /**
   * Writes a new job's record and enqueues the job. On one Redis, when the queue uses the same client as the
   * stores (as in the API), both go out at once, in one round trip: the record's SET is sent first, and Redis runs
   * a connection's commands in the order sent, so no worker can take the job before its record exists. On a Redis
   * Cluster the record and the queue live on different nodes, in no order, and two clients keep no order either:
   * the add then waits for the record. Throws if either failed (the record's failure first); the caller undoes both.
   */
  private async recordAndEnqueue(job: JobRecord): Promise<Job<UploadJobData>> {
    const add = () => this.queue.add('upload-key', { jobId: job.id, account: job.account }, { ...uploadJobOptions(this.config), jobId: job.id });
    if (!this.#recordWithAdd) {
      await this.stores.jobs.create(job);
      return add();
    }
    const [created, added] = await Promise.allSettled([this.stores.jobs.create(job), add()]);
    if (created.status === 'rejected') throw created.reason;
    if (added.status === 'rejected') throw added.reason;
    return added.value;
  }

  /**
   * Validates every item first (errors named `items[i].path`), then records the batch and all its job
   * records in one MULTI, then enqueues all jobs with one addBulk. A crash between the two leaves a
   * recorded batch with `enqueued=0` and no answer to the client; a retry with the same Idempotency-Key
   * enqueues it (BullMQ ignores job ids it already has).
   */
  async submitBatch(account: string, body: unknown, idempotencyKey: string | undefined): Promise<BatchSubmission> {
    checkIdempotencyKey(idempotencyKey);
    const { items: rawItems, callback_url } = parseOrThrow(batchBodySchema, body);
    const errors: FieldError[] = [];
    const items: UploadKeyRequest[] = [];
    rawItems.forEach((raw, i) => {
      try {
        items.push(parseUploadKey(raw));
      } catch (err) {
        if (!(err instanceof ValidationError)) throw err;
        for (const e of err.errors ?? []) errors.push({ path: e.path === '(body)' ? `items[${i}]` : `items[${i}].${e.path}`, message: e.message });
      }
    });
    if (errors.length > 0) throw batchValidationError(errors);
    this.checkCallbackUrls([[callback_url, 'callback_url'], ...items.map((it, i): [string | undefined, string] => [it.callback_url, `items[${i}].callback_url`])]);
    const kmsIds = await this.resolveReferences(account, items, (i, path) => `items[${i}].${path}`);
    const dupes = duplicateAliases(items, kmsIds);
    if (dupes.length > 0) throw batchValidationError(dupes);

    const batchId = randomUUID();
    const load = (id: string) => this.stores.batches.getOwned(account, id);
    const claim = await this.claimIdempotency(account, idempotencyKey, { items, callback_url }, batchId, load);
    if (claim.priorId) {
      const prior = await this.waitForRecord(() => load(claim.priorId as string));
      if (!prior.batch.enqueued) await this.enqueueBatch(prior.batch.id, account, prior.batch.total);
      return { batchId: prior.batch.id, replayed: true };
    }

    const now = new Date().toISOString();
    const batch: BatchRecord = {
      id: batchId,
      account,
      status: 'running',
      total: items.length,
      created_at: now,
      updated_at: now,
      finished_at: null,
      callback_url: callback_url ?? null,
      enqueued: 0,
      completions: 0,
    };
    const jobs = items.map((request, index) =>
      newJobRecord({ id: `${batchId}.${index}`, account, request, kmsId: kmsIds[index] as string, maxAttempts: this.config.JOB_ATTEMPTS, batch: { id: batchId, index } }),
    );
    try {
      await this.stores.batches.create(batch, jobs);
    } catch (err) {
      await claim.release();
      throw err;
    }
    await this.enqueueBatch(batchId, account, items.length);
    jobsAccepted.inc({ kind: 'batch' }, items.length);
    return { batchId, replayed: false };
  }

  /** Callback URLs must be https (http only with WEBHOOK_ALLOW_HTTP) and carry no credentials. */
  private checkCallbackUrls(urls: [string | undefined, string][]): void {
    const errors = urls.flatMap(([url, path]) => (url === undefined ? [] : checkWebhookUrl(url, { allowHttp: this.config.WEBHOOK_ALLOW_HTTP, path })));
    if (errors.length > 0) throw batchValidationError(errors);
  }

  private async enqueueBatch(batchId: string, account: string, total: number): Promise<void> {
    const opts = { ...uploadJobOptions(this.config), priority: BATCH_PRIORITY };
    const entries = Array.from({ length: total }, (_, i) => ({
      name: 'upload-key',
      data: { jobId: `${batchId}.${i}`, account },
      opts: { ...opts, jobId: `${batchId}.${i}` },
    }));
    await this.queue.addBulk(entries);
    await this.stores.batches.markEnqueued(batchId);
  }

  /** Each item's KMS connection must exist and serve its region; named templates and source connections must exist. Returns connection ids. */
  private async resolveReferences(account: string, reqs: UploadKeyRequest[], at: (i: number, path: string) => string): Promise<string[]> {
    const conns = new Map(
      await Promise.all([...new Set(reqs.map((r) => r.kms))].map(async (k) => [k, await this.stores.kmsConnections.find(account, k)] as const)),
    );
    const templateNames = [...new Set(reqs.map((r) => r.policytemplate).filter((t): t is string => t !== undefined))];
    const templates = new Map(await Promise.all(templateNames.map(async (t) => [t, await this.stores.templates.find(account, t)] as const)));
    const sourceRef = (r: UploadKeyRequest) => JSON.stringify([r.source_key_tier, r.source_connection]);
    const sourceRefs = new Map(reqs.filter((r) => r.source_connection !== undefined).map((r) => [sourceRef(r), r] as const));
    const sourceConns = new Map(
      await Promise.all(
        [...sourceRefs].map(async ([ref, r]) => {
          const store = r.source_key_tier === 'dsm' ? this.stores.dsmConnections : this.stores.hsmConnections;
          return [ref, (await store.find(account, r.source_connection as string)) !== undefined] as const;
        }),
      ),
    );
    const errors: FieldError[] = [];
    const ids = reqs.map((req, i) => {
      const conn = conns.get(req.kms);
      if (!conn) errors.push({ path: at(i, 'kms'), message: `No KMS connection named or with id "${req.kms}".` });
      else if (!conn.regions.includes(req.region)) {
        errors.push({ path: at(i, 'region'), message: `The KMS connection "${conn.name}" does not serve ${req.region} (it serves ${conn.regions.join(', ')}).` });
      }
      if (req.policytemplate && !templates.get(req.policytemplate)) {
        errors.push({ path: at(i, 'policytemplate'), message: `No policy template named or with id "${req.policytemplate}".` });
      }
      if (req.source_connection !== undefined && !sourceConns.get(sourceRef(req))) {
        const kind = req.source_key_tier === 'dsm' ? 'DSM (KMIP)' : 'HSM';
        errors.push({ path: at(i, 'source_connection'), message: `No ${kind} connection named or with id "${req.source_connection}".` });
      }
      return conn?.id ?? '';
    });
    if (errors.length > 0) throw new UnprocessableError('unknown_reference', 'The request names resources that do not exist.', errors.slice(0, MAX_REPORTED_ERRORS));
    return ids;
  }

  /**
   * Claims an Idempotency-Key for `newId`. If the key was used before with the same body, returns the
   * earlier id; with another body, throws 422. `release` frees a claim whose request then failed.
   *
   * A claim can outlive its request without a record: Redis ran the SET NX but its answer was lost and the
   * request failed (503) before it could release the claim. A claim older than `staleClaimMs` whose record
   * `load` does not find is taken over (compare-and-set on the claim's value), so a retry is accepted instead
   * of answering 409 `idempotency_key_in_flight` for the key's whole lifetime. A request writes its record
   * right after claiming (one Redis command, or one MULTI for a batch, failing fast while Redis is away), far
   * within that time. `release` deletes the claim only while it is still this request's.
   */
  private async claimIdempotency(
    account: string,
    key: string | undefined,
    body: unknown,
    newId: string,
    load: (priorId: string) => Promise<unknown>,
  ): Promise<{ priorId?: string; release(): Promise<unknown> }> {
    if (key === undefined) return { release: async () => 0 };
    const redisKey = this.stores.keys.idempotency(account, sha256Hex(key));
    const fingerprint = sha256Hex(canonicalJson(body));
    const value = JSON.stringify({ fingerprint, id: newId, at: Date.now() });
    const release = () => this.#releaseClaim([redisKey], [value]);
    const claimed = await this.redis.set(redisKey, value, 'EX', IDEMPOTENCY_TTL_SECONDS, 'NX');
    if (claimed !== null) return { release };
    const raw = await this.redis.get(redisKey);
    if (!raw) return this.claimIdempotency(account, key, body, newId, load); // it expired just now
    const prior = JSON.parse(raw) as { fingerprint: string; id: string; at?: number };
    // Our own claim: Redis ran the SET NX, its answer was lost, and ioredis sent it again after reconnecting.
    if (prior.id === newId) return { release };
    if (prior.fingerprint !== fingerprint) {
      throw new UnprocessableError('idempotency_key_reused', 'This Idempotency-Key was used with a different request body.');
    }
    if (Date.now() - (prior.at ?? 0) > this.staleClaimMs && (await load(prior.id)) === undefined) {
      const taken = await this.#takeOverClaim([redisKey], [raw, value, IDEMPOTENCY_TTL_SECONDS]);
      if (Number(taken) === 1) return { release };
      return this.claimIdempotency(account, key, body, newId, load); // another request changed it meanwhile
    }
    return { priorId: prior.id, release };
  }

  /** The first request with an Idempotency-Key may still be writing its record: wait for it briefly. */
  private async waitForRecord<T>(load: () => Promise<T | undefined>): Promise<T> {
    for (let i = 0; i < 40; i++) {
      const found = await load();
      if (found) return found;
      await new Promise((r) => setTimeout(r, 50));
    }
    throw new AppError(409, 'idempotency_key_in_flight', 'A request with this Idempotency-Key is still being accepted; retry shortly.');
  }
}

function checkIdempotencyKey(key: string | undefined): void {
  if (key !== undefined && !IDEMPOTENCY_KEY_RE.test(key)) {
    throw new ValidationError([{ path: 'header:Idempotency-Key', message: '1 to 255 printable ASCII characters.' }]);
  }
}

function batchValidationError(errors: FieldError[]): ValidationError {
  const shown = errors.slice(0, MAX_REPORTED_ERRORS);
  const more = errors.length - shown.length;
  return new ValidationError(shown, more > 0 ? `The batch is not valid: ${errors.length} errors, the first ${shown.length} listed.` : 'The batch is not valid.');
}

/** Two items may not claim one alias in the same KMS connection and region. */
function duplicateAliases(items: UploadKeyRequest[], kmsIds: string[]): FieldError[] {
  const seen = new Map<string, number>();
  const errors: FieldError[] = [];
  items.forEach((req, i) => {
    const alias = req.aws_param.Alias;
    if (!alias) return;
    const key = `${kmsIds[i]}|${req.region}|${alias}`;
    const first = seen.get(key);
    if (first === undefined) seen.set(key, i);
    else errors.push({ path: `items[${i}].aws_param.Alias`, message: `Duplicate of items[${first}]: an alias names one key per KMS connection and region.` });
  });
  return errors;
}

/**
 * Undoes an upload whose record or enqueue failed, so that nothing half-made stays behind and the client may
 * simply retry: the BullMQ job is removed, the record deleted, the Idempotency-Key claim released, each as far
 * as Redis allows. Unless a worker already holds the job and its record exists: then Redis ran both and only
 * their answers were lost (a dropped connection), and the job was in fact accepted. It runs, its record and
 * claim stay, and a retry with the same Idempotency-Key is answered with it. BullMQ does not remove a job a
 * worker holds: remove answers 0.
 */
export async function undoSubmission(queue: UploadQueue, jobs: JobStore, id: string, releaseClaim: () => Promise<unknown>): Promise<void> {
  const removed = await queue.remove(id).catch(() => undefined);
  if (removed === 0 && (await jobs.get(id)) !== undefined) return;
  await Promise.allSettled([jobs.delete(id), releaseClaim()]);
}
