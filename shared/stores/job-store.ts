import type { RedisClient } from '../redis.js';
import { FINAL_STATUSES, JOB_STATUSES, jobResource, type JobRecord, type JobStatus } from '../jobs.js';
import type { Keyspace } from './keyspace.js';

/**
 * Writes a job record and, in the same atomic step (all keys share the job's hash tag):
 * - appends the job resource to the job's event stream when status or step changed;
 * - for a batch job whose status changed: moves it between the batch's status counters and indexes,
 *   appends a progress event with the new counts to the batch's stream, and, when this change finishes
 *   the batch, marks it completed once and appends a `completed` event.
 * Returns the batch's completion number (1 the first time, 2 after a retry-failed run ends, ...) or 0;
 * -1 when an expected status was given and the stored record is not in it (nothing written).
 * Records of finished jobs and every key of a completed batch expire after the retention; event streams,
 * which serve live watchers, an hour after the end (a late watcher gets the final state from the record).
 */
const EVENTS_RETENTION_SECONDS = 3600;
const WRITE_SCRIPT = `
if ARGV[8] ~= '' then
  local current = redis.call('GET', KEYS[1])
  if not current or cjson.decode(current).status ~= ARGV[8] then return -1 end
end
redis.call('SET', KEYS[1], ARGV[1])
if ARGV[2] ~= '' then redis.call('XADD', KEYS[2], 'MAXLEN', '~', '200', '*', 'event', 'job', 'data', ARGV[2]) end
if ARGV[10] == '1' then
  redis.call('EXPIRE', KEYS[1], ARGV[9])
  redis.call('EXPIRE', KEYS[2], ARGV[11])
else
  redis.call('PERSIST', KEYS[1])
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
if done == tonumber(redis.call('HGET', KEYS[7], 'total')) and redis.call('HGET', KEYS[7], 'status') ~= 'completed' then
  redis.call('HSET', KEYS[7], 'status', 'completed', 'finished_at', ARGV[7])
  completion = redis.call('HINCRBY', KEYS[7], 'completions', 1)
end
local progress = cjson.encode({ job_id = ARGV[5], index = tonumber(ARGV[6]), status = ARGV[4], counts = counts })
redis.call('XADD', KEYS[6], 'MAXLEN', '~', '100000', '*', 'event', 'progress', 'data', progress)
if completion > 0 then redis.call('XADD', KEYS[6], 'MAXLEN', '~', '100000', '*', 'event', 'completed', 'data', '') end
-- A completed batch's keys expire with the retention; a reopened one (retry-failed) keeps them.
for i = 3, #KEYS do
  if i ~= 4 and i ~= 5 then
    local ttl = ARGV[9]
    if i == 6 then ttl = ARGV[11] end
    if redis.call('HGET', KEYS[7], 'status') == 'completed' then redis.call('EXPIRE', KEYS[i], ttl) else redis.call('PERSIST', KEYS[i]) end
  end
end
return completion`;

export interface JobUpdate {
  job: JobRecord;
  /** Non-zero when this update completed the job's batch: the batch's completion number. */
  batchCompletion: number;
}

/** Job records, one JSON string per job, keyed by job id, with their event streams and batch counters. */
export class JobStore {
  constructor(
    private readonly redis: RedisClient,
    private readonly keys: Keyspace,
    private readonly retentionSeconds: number,
  ) {}

  async create(job: JobRecord): Promise<void> {
    await this.redis.set(this.keys.job(job.id), JSON.stringify(job));
  }

  async get(id: string): Promise<JobRecord | undefined> {
    const raw = await this.redis.get(this.keys.job(id));
    return raw ? (JSON.parse(raw) as JobRecord) : undefined;
  }

  /** Only the account that owns a job sees it. */
  async getOwned(account: string, id: string): Promise<JobRecord | undefined> {
    const job = await this.get(id);
    return job && job.account === account ? job : undefined;
  }

  /**
   * Applies a change to a record. A job has one writer at a time (the worker holding BullMQ's lock, or
   * the API before the job is enqueued or after it was removed unstarted), so read-modify-write is safe.
   */
  async update(id: string, change: (job: JobRecord) => void): Promise<JobUpdate> {
    const done = await this.updateIf(id, undefined, change);
    if (!done) throw new Error(`job record ${id} is missing`);
    return done;
  }

  /**
   * Like update, but only if the stored status is still `expected` when the write happens (checked inside
   * the write script): the guard for changes that race, such as cancel or retry-failed against a worker.
   * Undefined when the record is missing or its status moved on.
   */
  async updateIf(id: string, expected: JobStatus | undefined, change: (job: JobRecord) => void): Promise<JobUpdate | undefined> {
    const job = await this.get(id);
    if (!job || (expected !== undefined && job.status !== expected)) return undefined;
    const before: { status: JobStatus; step: JobRecord['step'] } = { status: job.status, step: job.step };
    change(job);
    job.updated_at = new Date().toISOString();
    const changed = job.status !== before.status || job.step !== before.step;
    const batchMove = job.batch_id !== null && job.status !== before.status;
    const batchId = job.batch_id ?? id;
    const batchKeys = job.batch_id
      ? [...JOB_STATUSES.map((s) => this.keys.batchStatusIndex(batchId, s))]
      : [];
    const completion = await this.redis.eval(
      WRITE_SCRIPT,
      7 + batchKeys.length,
      this.keys.job(id),
      this.keys.jobEvents(id),
      this.keys.batchCounts(batchId),
      this.keys.batchStatusIndex(batchId, before.status),
      this.keys.batchStatusIndex(batchId, job.status),
      this.keys.batchEvents(batchId),
      this.keys.batch(batchId),
      ...batchKeys,
      JSON.stringify(job),
      changed ? JSON.stringify(jobResource(job)) : '',
      before.status,
      batchMove ? job.status : '',
      id,
      String(job.batch_index ?? 0),
      job.updated_at,
      expected ?? '',
      String(this.retentionSeconds),
      FINAL_STATUSES.includes(job.status) ? '1' : '0',
      String(Math.min(EVENTS_RETENTION_SECONDS, this.retentionSeconds)),
    );
    if (Number(completion) === -1) return undefined;
    return { job, batchCompletion: Number(completion) };
  }

  async delete(id: string): Promise<void> {
    await this.redis.del(this.keys.job(id));
  }
}
