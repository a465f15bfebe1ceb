import { randomUUID } from 'node:crypto';
import { Cluster } from 'ioredis';
import { defineScript, type RedisClient, type RedisScript } from '../redis.js';
import { FINAL_STATUSES, JOB_STATUSES, isJobId, jobResource, type JobRecord, type JobStatus } from '../jobs.js';
import type { Keyspace } from './keyspace.js';

/**
 * Writes a job record and, in the same atomic step (all keys share the job's hash tag):
 * - appends the job resource to the job's event stream when status or step changed;
 * - for a batch job whose status changed: moves it between the batch's status counters and indexes,
 *   appends a progress event with the new counts to the batch's stream, and, when this change finishes
 *   the batch, marks it completed once and appends a `completed` event; when it takes a job of a completed
 *   batch out of its final status (retry-failed), the batch is `running` again (its keys then lose their TTLs).
 * Returns the batch's completion number (1 the first time, 2 after a retry-failed run ends, ...) or 0;
 * -1 when an expected status was given and the stored record is not in it (nothing written).
 * Records of finished jobs and every key of a completed batch expire after the retention; event streams,
 * which serve live watchers, an hour after the end (a late watcher gets the final state from the record).
 */
const EVENTS_RETENTION_SECONDS = 3600;
/**
 * A write whose JSON is already the stored one has happened: it is this very write sent again (ioredis sends
 * the commands Redis did not answer once more after a reconnect, and Redis may have run them before the
 * connection dropped). Every write carries a random `write_id` in its JSON, so two writers' writes never look
 * the same (two retry-failed calls in the same millisecond would otherwise both win the compare-and-set).
 * Nothing is applied twice (no event, no batch counter moved again, no failed compare-and-set against its own
 * result); it answers as the first run did, as far as it matters: the batch's completion number when this
 * final write completed the batch (the batch's finished_at is this write's time), else 0.
 *
 * ARGV[12], when not empty, is the `"write_id":"<id>"` member of the stored JSON the writer holds (a write
 * from a held record, JobStore.updateFrom): the write happens only if the stored JSON still holds it, that is,
 * if the record is still exactly that one (every write stores a new random id; inside a JSON string every
 * quote is escaped, so no field's value can hold the member), else -2 and nothing is written.
 * ARGV[13] is '1' when the job's keys may carry a TTL (the record was final, or is not known): only then does
 * a non-final write PERSIST its event stream. SET itself drops the record's own TTL.
 * ARGV[14] is '1' when the last of KEYS is a key that this write SETs to ARGV[15] before the record, once the
 * checks passed, so that both are written or neither (the uploaded-key resource of a job that succeeds). It is
 * in another hash slot than the job's keys: only a single Redis runs it so (JobStore.#apply).
 */
const WRITE_SCRIPT = `
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  if ARGV[4] ~= '' and ARGV[10] == '1' and redis.call('HGET', KEYS[7], 'status') == 'completed' and redis.call('HGET', KEYS[7], 'finished_at') == ARGV[7] then
    return tonumber(redis.call('HGET', KEYS[7], 'completions'))
  end
  return 0
end
if ARGV[12] ~= '' then
  if not current or not string.find(current, ARGV[12], 1, true) then return -2 end
elseif ARGV[8] ~= '' then
  if not current or cjson.decode(current).status ~= ARGV[8] then return -1 end
end
local ownKeys = #KEYS
if ARGV[14] == '1' then
  redis.call('SET', KEYS[ownKeys], ARGV[15])
  ownKeys = ownKeys - 1
end
redis.call('SET', KEYS[1], ARGV[1])
if ARGV[2] ~= '' then redis.call('XADD', KEYS[2], 'MAXLEN', '~', '200', '*', 'event', 'job', 'data', ARGV[2]) end
if ARGV[10] == '1' then
  redis.call('EXPIRE', KEYS[1], ARGV[9])
  redis.call('EXPIRE', KEYS[2], ARGV[11])
elseif ARGV[13] == '1' then
  redis.call('PERSIST', KEYS[2])
end
if ARGV[4] == '' then return 0 end
redis.call('HINCRBY', KEYS[3], ARGV[3], -1)
redis.call('HINCRBY', KEYS[3], ARGV[4], 1)
redis.call('ZREM', KEYS[4], ARGV[5])
redis.call('ZADD', KEYS[5], tonumber(ARGV[6]), ARGV[5])
local flat = redis.call('HGETALL', KEYS[3])
local counts = {}
for i = 1, #flat, 2 do counts[flat[i]] = tonumber(flat[i + 1]) end
redis.call('HSET', KEYS[7], 'updated_at', ARGV[7])
local done = (counts['succeeded'] or 0) + (counts['failed'] or 0) + (counts['canceled'] or 0)
local completion = 0
local total = tonumber(redis.call('HGET', KEYS[7], 'total'))
local wasCompleted = redis.call('HGET', KEYS[7], 'status') == 'completed'
if done == total and not wasCompleted then
  redis.call('HSET', KEYS[7], 'status', 'completed', 'finished_at', ARGV[7])
  completion = redis.call('HINCRBY', KEYS[7], 'completions', 1)
elseif done < total and wasCompleted then
  redis.call('HSET', KEYS[7], 'status', 'running', 'finished_at', '')
end
local progress = cjson.encode({ job_id = ARGV[5], index = tonumber(ARGV[6]), status = ARGV[4], counts = counts })
redis.call('XADD', KEYS[6], 'MAXLEN', '~', '100000', '*', 'event', 'progress', 'data', progress)
if completion > 0 then redis.call('XADD', KEYS[6], 'MAXLEN', '~', '100000', '*', 'event', 'completed', 'data', '') end
-- A completed batch's keys expire with the retention; a reopened one (retry-failed) keeps them. They get
-- their TTLs together, so the batch hash tells whether the others carry one that a reopened batch must drop.
local completed = redis.call('HGET', KEYS[7], 'status') == 'completed'
local persist = not completed and redis.call('TTL', KEYS[7]) ~= -1
if completed or persist then
  for i = 3, ownKeys do
    if i ~= 4 and i ~= 5 then
      local ttl = ARGV[9]
      if i == 6 then ttl = ARGV[11] end
      if completed then redis.call('EXPIRE', KEYS[i], ttl) else redis.call('PERSIST', KEYS[i]) end
    end
  end
end
return completion`;

export interface JobUpdate {
  job: JobRecord;
  /** Non-zero when this update completed the job's batch: the batch's completion number. */
  batchCompletion: number;
}

/** A key written together with a job's record (JobStore.updateFrom): the record is written only if it was. */
export interface AlongsideSet {
  key: string;
  value: string;
}

/**
 * What JobStore.updateFrom throws when the record is no longer the one the writer holds: someone else wrote
 * (or removed) it since. Nothing was written.
 */
export class JobTakenOver extends Error {
  constructor(readonly jobId: string) {
    super(`the record of job ${jobId} was written or removed by someone else since this writer last read or wrote it`);
    this.name = 'JobTakenOver';
  }
}

/**
 * A record as read or last written by its one writer: a later write from it (updateFrom) needs no read first.
 * It is not changed afterwards.
 */
export interface HeldJob {
  job: JobRecord;
}

/**
 * A copy of a held record for a change to apply to: its top-level fields and those of `progress` are its own.
 * Changes set those (and replace, never alter, any other object: `error`, `result`, `request`), so the held
 * record stays as it was; cheaper than parsing the stored JSON again.
 */
function copyForChange(job: JobRecord): JobRecord {
  return { ...job, progress: { ...job.progress } };
}

/** Job records, one JSON string per job, keyed by job id, with their event streams and batch counters. */
export class JobStore {
  readonly #write: RedisScript;

  constructor(
    private readonly redis: RedisClient,
    private readonly keys: Keyspace,
    private readonly retentionSeconds: number,
  ) {
    this.#write = defineScript(redis, 'job_write', WRITE_SCRIPT);
  }

  /**
   * Writes a new job's record, only if no record has its id (SET NX): the id is a fresh UUID, so a record found
   * there is this write's own, run by Redis before a dropped connection lost its answer. ioredis then sends the
   * SET again, by which time a worker may have started the job: NX keeps its record. Sends the SET before it
   * returns (Intake sends BullMQ's add right after it, relying on that order).
   */
  async create(job: JobRecord): Promise<void> {
    await this.redis.set(this.keys.job(job.id), JSON.stringify(job), 'NX');
  }

  async get(id: string): Promise<JobRecord | undefined> {
    return (await this.getHeld(id))?.job;
  }

  /** The record, for a writer that goes on to write it (updateFrom). */
  async getHeld(id: string): Promise<HeldJob | undefined> {
    const raw = await this.redis.get(this.keys.job(id));
    return raw ? { job: JSON.parse(raw) as JobRecord } : undefined;
  }

  /** Only the account that owns a job sees it; an id not of a job's form (isJobId) names none. */
  async getOwned(account: string, id: string): Promise<JobRecord | undefined> {
    if (!isJobId(id)) return undefined;
    const job = await this.get(id);
    return job && job.account === account ? job : undefined;
  }

  /**
   * Applies a change to a record, only if the stored status is still `expected` (if given) when the write
   * happens (checked inside the write script): the guard for changes that race, such as cancel or retry-failed
   * against a worker. Undefined when the record is missing or its status moved on.
   */
  async updateIf(id: string, expected: JobStatus | undefined, change: (job: JobRecord) => void, alongside?: AlongsideSet): Promise<JobUpdate | undefined> {
    const held = await this.getHeld(id);
    if (!held || (expected !== undefined && held.job.status !== expected)) return undefined;
    const done = await this.#apply(held.job, change, { expected, alongside });
    return done === 'changed' ? undefined : done;
  }

  /**
   * The write of a job's one writer, from the record it last read or wrote: only if the stored record is still
   * exactly that one (checked inside the write script by its `write_id`). Throws JobTakenOver if anything else
   * wrote it meanwhile, or removed it: for a worker's run, another worker took the job over (this run's BullMQ
   * lock expired, e.g. while its process was frozen), and this run must write nothing more. A held record
   * without a `write_id` (written before there were any) is written only if the stored status is still the
   * held one (updateIf). With `alongside`, that key is SET too, in the same round trip on a single Redis (the
   * record is written only if it was, and so is the key); a Cluster client SETs it first.
   */
  async updateFrom(held: HeldJob, change: (job: JobRecord) => void, alongside?: AlongsideSet): Promise<JobUpdate> {
    const job = copyForChange(held.job);
    const done =
      job.write_id === undefined
        ? await this.updateIf(job.id, job.status, change, alongside)
        : await this.#apply(job, change, { expected: undefined, version: job.write_id, alongside });
    if (done === undefined || done === 'changed') throw new JobTakenOver(job.id);
    return done;
  }

  /**
   * Writes `job` after `change`; with a version (the held record's write_id), only if the stored record is still
   * that write ('changed' if not); with `expected`, only if the stored status is still that (undefined if not).
   */
  async #apply(
    job: JobRecord,
    change: (job: JobRecord) => void,
    opts: { expected: JobStatus | undefined; version?: string; alongside?: AlongsideSet | undefined },
  ): Promise<JobUpdate | undefined | 'changed'> {
    const { id } = job;
    let { alongside } = opts;
    // On a Cluster the key is in another slot than the record's: it is written first, on its own.
    if (alongside && this.redis instanceof Cluster) {
      await this.redis.set(alongside.key, alongside.value);
      alongside = undefined;
    }
    const before: { status: JobStatus; step: JobRecord['step'] } = { status: job.status, step: job.step };
    change(job);
    job.updated_at = new Date().toISOString();
    job.write_id = randomUUID();
    const changed = job.status !== before.status || job.step !== before.step;
    const batchMove = job.batch_id !== null && job.status !== before.status;
    const batchId = job.batch_id ?? id;
    const stored = JSON.stringify(job);
    // Keys carry a TTL only after a final write: a record known to be unfinished needs no PERSIST.
    const mayHaveTtl = opts.version === undefined || FINAL_STATUSES.includes(before.status);
    // The batch's keys only when the job moves between the batch's statuses: the script touches no other then.
    const keys = [this.keys.job(id), this.keys.jobEvents(id)];
    if (batchMove) {
      keys.push(
        this.keys.batchCounts(batchId),
        this.keys.batchStatusIndex(batchId, before.status),
        this.keys.batchStatusIndex(batchId, job.status),
        this.keys.batchEvents(batchId),
        this.keys.batch(batchId),
        ...JOB_STATUSES.map((s) => this.keys.batchStatusIndex(batchId, s)),
      );
    }
    if (alongside) keys.push(alongside.key);
    const completion = await this.#write(
      keys,
      [
        stored,
        changed ? JSON.stringify(jobResource(job)) : '',
        before.status,
        batchMove ? job.status : '',
        id,
        String(job.batch_index ?? 0),
        job.updated_at,
        opts.expected ?? '',
        String(this.retentionSeconds),
        FINAL_STATUSES.includes(job.status) ? '1' : '0',
        String(Math.min(EVENTS_RETENTION_SECONDS, this.retentionSeconds)),
        opts.version === undefined ? '' : JSON.stringify({ write_id: opts.version }).slice(1, -1),
        mayHaveTtl ? '1' : '0',
        alongside ? '1' : '',
        alongside?.value ?? '',
      ],
    );
    if (Number(completion) === -2) return 'changed';
    if (Number(completion) === -1) return undefined;
    return { job, batchCompletion: Number(completion) };
  }

  async delete(id: string): Promise<void> {
    await this.redis.del(this.keys.job(id));
  }
}
