import { randomUUID } from 'node:crypto';
import type { Job } from 'bullmq';
import { Cluster } from 'ioredis';
import { BATCH_PRIORITY, batchBodySchema, type BatchRecord } from '../shared/batches.js';
import type { Config } from '../shared/config.js';
import type { Stores } from '../shared/context.js';
import { UnprocessableError, ValidationError, type FieldError } from '../shared/errors.js';
import { kmsEndpointPolicy, kmsEndpointProblem, type KmsEndpointPolicy } from '../shared/kms-endpoints.js';
import { FINAL_STATUSES, newJobRecord, type JobRecord, type UploadJobData } from '../shared/jobs.js';
import { batchesRecovered, jobsAccepted } from '../shared/metrics.js';
import { uploadJobOptions, type UploadQueue } from '../shared/queues.js';
import type { RedisClient } from '../shared/redis.js';
import { parseUploadKey, type UploadKeyRequest } from '../shared/schemas/upload-key.js';
import type { KmsConnection } from '../shared/resources.js';
import { checkWebhookUrl } from '../shared/ssrf.js';
import type { BatchOwner, BatchStore } from '../shared/stores/batch-store.js';
import type { JobStore } from '../shared/stores/job-store.js';
import { parseOrThrow } from '../shared/validation.js';
import { Claim, Idempotency, STALE_CLAIM_MS } from './idempotency.js';

/** How many BullMQ jobs undoBatch removes per round trip. */
const UNDO_CHUNK = 500;
const IDEMPOTENCY_KEY_RE = /^[\x21-\x7e]{1,255}$/;
/** A 400 for a huge batch lists this many errors at most (the rest are counted). */
const MAX_REPORTED_ERRORS = 1000;

export interface Submission {
  job: JobRecord;
  bullJob: Job<UploadJobData> | undefined;
  replayed: boolean;
}

/**
 * What Intake.recoverStrandedBatches did with a batch: `left` to a retry with its Idempotency-Key or to its
 * request's undo under way; `nothing` to do (gone, or enqueued meanwhile).
 */
export type RecoveryOutcome = 'undone' | 'enqueued' | 'left' | 'nothing' | 'failed';

export interface BatchSubmission {
  batchId: string;
  replayed: boolean;
}

/** Validates, authorises against the account's resources, records and enqueues upload jobs and batches. */
export class Intake {
  readonly #idempotency: Idempotency;
  /** Whether a new job's record and its add go out together (recordAndEnqueue): one Redis, one client for both. */
  readonly #recordWithAdd: boolean;
  readonly #endpoints: KmsEndpointPolicy;

  constructor(
    private readonly config: Config,
    private readonly redis: RedisClient,
    private readonly stores: Stores,
    private readonly queue: UploadQueue,
    /** How old a claim without a record must be before a retry takes it over (see Idempotency.claim). */
    staleClaimMs = STALE_CLAIM_MS,
  ) {
    this.#idempotency = new Idempotency(redis, stores.keys, staleClaimMs);
    this.#recordWithAdd = !(redis instanceof Cluster) && queue.opts.connection === redis;
    this.#endpoints = kmsEndpointPolicy(config);
  }

  async submitUpload(account: string, body: unknown, idempotencyKey: string | undefined): Promise<Submission> {
    checkIdempotencyKey(idempotencyKey);
    const req = parseUploadKey(body);
    this.checkCallbackUrls([[req.callback_url, 'callback_url']]);
    const [kmsId] = await this.resolveReferences(account, [req], (_i, path) => path);
    const id = randomUUID();

    const load = (jobId: string) => this.stores.jobs.getOwned(account, jobId);
    for (;;) {
      const { prior, claim } = await this.#idempotency.claim(account, idempotencyKey, req, id, load);
      if (prior) {
        const job = await this.#idempotency.waitForRecord(() => load(prior.id));
        // The first request may have recorded its job and then failed to enqueue it (and to clean up, with Redis
        // away): a replay enqueues a still-queued job again (BullMQ ignores a job id it already has), once it has
        // marked the claim adopted, so that the first request's undo, if it is still to come, leaves it alone.
        if (job.status === 'queued') {
          if (!(await this.#idempotency.adopt(prior))) continue; // it is being undone
          await this.enqueue(job.id, account);
        }
        return { job, bullJob: undefined, replayed: true };
      }
      const job = newJobRecord({ id, account, request: req, kmsId: kmsId as string, maxAttempts: this.config.JOB_ATTEMPTS });
      try {
        const bullJob = await this.recordAndEnqueue(job);
        jobsAccepted.inc({ kind: 'single' });
        return { job, bullJob, replayed: false };
      } catch (err) {
        const undoQueue = { remove: (jobId: string) => this.queue.remove(jobId), enqueue: async () => void (await this.enqueue(id, account)) };
        await undoSubmission(undoQueue, this.stores.jobs, id, claim).catch(() => undefined);
        throw err;
      }
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
    const add = () => this.enqueue(job.id, job.account);
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
   * records in one MULTI, then enqueues all jobs with one addBulk. If the addBulk fails, the batch is taken
   * back (undoBatch). A crash between the two, or an undo that fails too (Redis away), leaves a recorded batch
   * with `enqueued=0`; a retry with the same Idempotency-Key enqueues it (BullMQ ignores job ids it already has),
   * and recoverStrandedBatches takes back one that no retry can come for.
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
    for (;;) {
      const { prior, claim } = await this.#idempotency.claim(account, idempotencyKey, { items, callback_url }, batchId, load);
      if (prior) {
        const { batch } = await this.#idempotency.waitForRecord(() => load(prior.id));
        if (!batch.enqueued) {
          if (!(await this.#idempotency.adopt(prior))) continue; // it is being undone
          await this.enqueueBatch(batch.id, account, batch.total);
        }
        return { batchId: batch.id, replayed: true };
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
        ...(claim.redisKey ? { claim: claim.redisKey } : {}),
      };
      const jobs = items.map((request, index) =>
        newJobRecord({ id: `${batchId}.${index}`, account, request, kmsId: kmsIds[index] as string, maxAttempts: this.config.JOB_ATTEMPTS, batch: { id: batchId, index } }),
      );
      try {
        // A MULTI whose answer was lost may have run: undone like a failed enqueue.
        await this.stores.batches.create(batch, jobs);
        await this.enqueueBatch(batchId, account, items.length);
      } catch (err) {
        await undoBatch(this.stores.batches, batchId, items.length, claim, {
          remove: (id) => this.queue.remove(id),
          enqueue: () => this.enqueueBatch(batchId, account, items.length),
        }).catch(() => undefined);
        throw err;
      }
      jobsAccepted.inc({ kind: 'batch' }, items.length);
      return { batchId, replayed: false };
    }
  }

  /**
   * Takes up to `limit` batches recorded and not enqueued for at least `ageMs` (BatchStore.takeStranded; no
   * other API process takes them for as long): their request died between its MULTI and its addBulk, or its
   * addBulk and then its undo both failed. The client got no 202 for them. One whose Idempotency-Key claim
   * still names it is left to a retry with that key, which enqueues it (looked at again after `ageMs`, until the
   * claim expires), and so is one whose request began undoing it less than `ageMs` ago. Any other is taken
   * over and then taken back as its request would have done (undoBatch): deleted with its jobs, or, if a worker
   * holds one of its jobs, enqueued in full; one whose jobs already ran in part is enqueued without removing
   * any (BullMQ keeps the ids of jobs it ran or holds for a retry, and ignores them). Stops between two batches
   * once `signal` is aborted.
   */
  async recoverStrandedBatches(
    ageMs: number,
    o: { onError?: (batchId: string, err: Error) => void; signal?: AbortSignal; limit?: number } = {},
  ): Promise<Record<RecoveryOutcome, number>> {
    const done: Record<RecoveryOutcome, number> = { undone: 0, enqueued: 0, left: 0, nothing: 0, failed: 0 };
    for (const id of await this.stores.batches.takeStranded(ageMs, o.limit ?? 100)) {
      if (o.signal?.aborted) break; // the rest is taken again after ageMs
      try {
        done[await this.recoverBatch(id, ageMs)]++;
      } catch (err) {
        done.failed++; // still listed: looked at again after ageMs
        batchesRecovered.inc({ outcome: 'failed' });
        o.onError?.(id, err as Error);
      }
    }
    return done;
  }

  /**
   * Takes the batch over (BatchStore.beginRecovery) before it undoes it, so that its request, should it only have
   * been slow, can neither mark it enqueued nor undo it any more.
   */
  private async recoverBatch(id: string, ageMs: number): Promise<Exclude<RecoveryOutcome, 'failed'>> {
    const { batches } = this.stores;
    await batches.relist(id); // not taken by another API process while this one handles it
    const found = await batches.get(id);
    if (found?.batch.claim && (await this.#idempotency.names(found.batch.claim, id))) return 'left';
    const begun = found ? await batches.beginRecovery(id, ageMs) : 'gone';
    if (begun === 'busy') return 'left';
    if (!found || begun !== 'ok') {
      await batches.unlist(id);
      return 'nothing';
    }
    const { account, total } = found.batch;
    const enqueue = () => this.enqueueBatch(id, account, total, 'recovery');
    let outcome: 'undone' | 'enqueued' = 'enqueued';
    if (found.counts.queued < total) {
      await enqueue();
    } else {
      outcome = 'undone';
      const queue = {
        remove: (jobId: string) => this.queue.remove(jobId),
        enqueue: async () => {
          outcome = 'enqueued';
          await enqueue();
        },
      };
      await undoBatch(batches, id, total, Claim.none, queue, 'recovery');
    }
    batchesRecovered.inc({ outcome });
    return outcome;
  }

  /** Adds a single upload's BullMQ job, under the job's id (BullMQ ignores an id it already has). */
  private enqueue(jobId: string, account: string): Promise<Job<UploadJobData>> {
    return this.queue.add('upload-key', { jobId, account }, { ...uploadJobOptions(this.config), jobId });
  }

  /** Callback URLs must be https (http only with WEBHOOK_ALLOW_HTTP) and carry no credentials. */
  private checkCallbackUrls(urls: [string | undefined, string][]): void {
    const errors = urls.flatMap(([url, path]) => (url === undefined ? [] : checkWebhookUrl(url, { allowHttp: this.config.WEBHOOK_ALLOW_HTTP, path })));
    if (errors.length > 0) throw batchValidationError(errors);
  }

  private async enqueueBatch(batchId: string, account: string, total: number, by: BatchOwner = 'request'): Promise<void> {
    const opts = { ...uploadJobOptions(this.config), priority: BATCH_PRIORITY };
    const entries = Array.from({ length: total }, (_, i) => ({
      name: 'upload-key',
      data: { jobId: `${batchId}.${i}`, account },
      opts: { ...opts, jobId: `${batchId}.${i}` },
    }));
    await this.queue.addBulk(entries);
    await this.stores.batches.markEnqueued(batchId, by);
  }

  /** Each item's KMS connection must exist and serve its region; named templates and source connections must exist. Returns connection ids. */
  private async resolveReferences(account: string, reqs: UploadKeyRequest[], at: (i: number, path: string) => string): Promise<string[]> {
    const conns = new Map(
      await Promise.all([...new Set(reqs.map((r) => r.kms))].map(async (k) => [k, await this.stores.kmsConnections.find(account, k)] as const)),
    );
    // Once per connection and region, not per item: a connection made before KMS_ENDPOINT_HOSTS was narrowed, or
    // before a regional endpoint had to serve all of the connection's regions.
    const endpointProblems = new Map<string, string | undefined>();
    const endpointProblem = (conn: KmsConnection, region: string) => {
      if (!conn.endpoint) return undefined;
      const key = `${conn.id}|${region}`;
      if (!endpointProblems.has(key)) endpointProblems.set(key, kmsEndpointProblem(conn.endpoint, this.#endpoints, [region]));
      return endpointProblems.get(key);
    };
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
      } else {
        const problem = endpointProblem(conn, req.region);
        if (problem) errors.push({ path: at(i, 'kms'), message: `The KMS connection "${conn.name}" names an endpoint this service does not allow: ${problem}` });
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

/** What an undo needs of the queue: to take a job out, and to put it (or a batch's jobs) back. */
export interface UndoQueue {
  remove(id: string): Promise<number>;
  enqueue(): Promise<void>;
}

/**
 * Undoes an upload whose record or enqueue failed, so that nothing half-made stays behind and the client may
 * simply retry: the BullMQ job is removed, the record deleted, the Idempotency-Key claim released, each as far
 * as Redis allows. Unless the job was accepted after all: Redis ran both and only their answers were lost (a
 * dropped connection), and a worker already holds the job (BullMQ's remove answers 0) or has started it (its
 * record is no longer queued; a job it then put back into BullMQ's delayed set, or left by dying, is enqueued
 * again if the remove took it). It then runs, its record and claim stay, and a retry with the same
 * Idempotency-Key is answered with it. The claim is marked `undoing` first: a replay with the same key waits
 * for the undo; if a replay marked it `adopted` before (it enqueues the job again), nothing is undone, and if
 * one did so while the undo stalled (past the stale-claim age), the undo puts the job back instead of deleting.
 */
export async function undoSubmission(queue: UndoQueue, jobs: JobStore, id: string, claim: Claim): Promise<void> {
  if (!(await claim.beginUndo())) return;
  const removed = await queue.remove(id).catch(() => undefined);
  const record = await jobs.get(id);
  if (record && (removed === 0 || record.status !== 'queued' || !(await claim.renewUndo()))) {
    if (removed !== 0 && !FINAL_STATUSES.includes(record.status)) await queue.enqueue();
    await claim.endUndo();
    return;
  }
  await Promise.allSettled([jobs.delete(id), claim.release()]);
}

/**
 * Undoes a batch whose addBulk failed, as undoSubmission does an upload: every job of the batch is taken out
 * of the queue (an addBulk is a pipeline of adds, some of which may have run), then the batch's records and
 * its claim are deleted. Unless a worker holds one of its jobs or has started one: the batch was accepted after
 * all, and its jobs are enqueued again (`enqueue`; BullMQ ignores a job id it already has). If Redis fails
 * here too, the batch stays as it is, recorded and not marked enqueued; its claim, left `undoing`, lets a retry
 * with the same key enqueue it once the claim is stale, and Intake.recoverStrandedBatches undoes it once no
 * claim names it. The delete refuses a batch one of whose jobs a worker started since the counts were read (and,
 * for a recovery, one marked enqueued): its jobs are then put back. A request's undo leaves a batch that a
 * recovery took over (its request stalled past the recovery age) to the recovery.
 */
export async function undoBatch(
  batches: BatchStore,
  batchId: string,
  total: number,
  claim: Claim,
  queue: UndoQueue,
  by: BatchOwner = 'request',
): Promise<void> {
  if (!(await claim.beginUndo())) return;
  // The request takes the batch first (no recovery takes it over for BATCH_RECOVERY_AFTER_MS from then on),
  // unless a recovery already did (the request stalled that long): the recovery then decides.
  if (by === 'request' && (await batches.beginUndo(batchId)) === 'recovering') return;
  let held = false;
  const ids = Array.from({ length: total }, (_, i) => `${batchId}.${i}`);
  for (let i = 0; i < ids.length; i += UNDO_CHUNK) {
    const removed = await Promise.all(ids.slice(i, i + UNDO_CHUNK).map((id) => queue.remove(id)));
    if (removed.includes(0)) held = true;
  }
  const found = await batches.get(batchId);
  const keep = found && (held || found.counts.queued < total || !(await claim.renewUndo()));
  // The delete keeps a batch one of whose jobs a worker started since the counts were read (or, for a recovery,
  // that was enqueued): the jobs the removes above took are put back.
  const outcome = keep ? 'kept' : await batches.delete(batchId, total, by);
  if (outcome === 'kept') {
    await queue.enqueue();
    await claim.endUndo();
  } else if (outcome === 'deleted') {
    await claim.release();
  } // 'recovering': a recovery took the batch over meanwhile (this undo stalled that long); it decides.
}
