import { emptyCounts, isBatchId, type BatchCounts, type BatchRecord } from '../batches.js';
import { JOB_STATUSES, type JobRecord, type JobStatus } from '../jobs.js';
import { defineScript, type RedisClient, type RedisScript } from '../redis.js';
import type { Keyspace } from './keyspace.js';

/** Who undoes or enqueues a batch: the request that made it, or a recovery that took it over (BatchStore.beginRecovery). */
export type BatchOwner = 'request' | 'recovery';

/**
 * Batches: the batch hash, its counts hash and per-status indexes, and its jobs' records all share the
 * batch id's hash tag, so a batch and all its job records are written in one MULTI.
 */
export class BatchStore {
  readonly #list: RedisScript;
  readonly #markEnqueued: RedisScript;
  readonly #delete: RedisScript;
  readonly #takeStranded: RedisScript;
  readonly #beginRecovery: RedisScript;
  readonly #beginUndo: RedisScript;

  constructor(
    private readonly redis: RedisClient,
    private readonly keys: Keyspace,
  ) {
    this.#list = defineScript(redis, 'batch_list_unenqueued', LIST_UNENQUEUED);
    this.#markEnqueued = defineScript(redis, 'batch_mark_enqueued', MARK_ENQUEUED);
    this.#delete = defineScript(redis, 'batch_delete', DELETE_BATCH);
    this.#takeStranded = defineScript(redis, 'batch_take_stranded', TAKE_STRANDED);
    this.#beginRecovery = defineScript(redis, 'batch_begin_recovery', BEGIN_RECOVERY);
    this.#beginUndo = defineScript(redis, 'batch_begin_undo', BEGIN_UNDO);
  }

  /**
   * Records a batch and every job record at once: all or nothing. The batch is listed as not yet enqueued
   * (keys.strandedBatches, in another slot on a Redis Cluster) until markEnqueued or delete: before the MULTI,
   * so that a crash right after it leaves the batch listed, and again after it, in case a recovery that found
   * no record yet unlisted it meanwhile (a request stalled past the recovery age in between).
   */
  async create(batch: BatchRecord, jobs: JobRecord[]): Promise<void> {
    await this.#list([this.keys.strandedBatches()], [batch.id, 0]);
    const multi = this.redis.multi();
    multi.hset(this.keys.batch(batch.id), toHash(batch));
    multi.hset(this.keys.batchCounts(batch.id), { ...emptyCounts(), queued: jobs.length });
    const index: (string | number)[] = [];
    for (const job of jobs) {
      multi.set(this.keys.job(job.id), JSON.stringify(job));
      index.push(job.batch_index ?? 0, job.id);
    }
    multi.zadd(this.keys.batchStatusIndex(batch.id, 'queued'), ...index);
    const results = await multi.exec();
    const failed = results?.find(([err]) => err);
    if (!results || failed) throw failed?.[0] ?? new Error('batch MULTI was discarded');
    await this.#list([this.keys.strandedBatches()], [batch.id, 0]);
  }

  /**
   * Deletes a batch and its jobs' records and event streams (undoBatch), in one script, only while none of its
   * jobs has left `queued` (a worker's start write moves the counts in the same slot) and, for `by` the request
   * that made it, while no recovery has taken it over (beginRecovery); for `by` a recovery, only one it took over
   * and not marked enqueued. All its keys share the batch's hash tag, also on a Redis Cluster. Answers
   * `deleted` (or already gone), `kept` (a job started, or the batch was enqueued), or `recovering` (the request
   * must leave the batch to the recovery).
   */
  async delete(id: string, total: number, by: BatchOwner = 'request'): Promise<'deleted' | 'kept' | 'recovering'> {
    const keys = [this.keys.batch(id), this.keys.batchCounts(id), this.keys.batchEvents(id), ...JOB_STATUSES.map((s) => this.keys.batchStatusIndex(id, s))];
    for (let i = 0; i < total; i++) keys.push(this.keys.job(`${id}.${i}`), this.keys.jobEvents(`${id}.${i}`));
    const answer = Number(await this.#delete(keys, [total, by === 'recovery' ? 1 : 0]));
    if (answer === -1) return 'recovering';
    if (answer !== 1) return 'kept';
    await this.unlist(id).catch(() => undefined); // a later recovery unlists a batch it finds gone
    return 'deleted';
  }

  /**
   * Marks a batch enqueued (all its jobs are in BullMQ), atomically only if its record still exists and, unless
   * `by` the recovery, no recovery has taken it over: otherwise it throws, and the request answers 500.
   */
  async markEnqueued(id: string, by: BatchOwner = 'request'): Promise<void> {
    if (Number(await this.#markEnqueued([this.keys.batch(id)], [by === 'recovery' ? 1 : 0])) !== 1) {
      throw new Error(`batch ${id} was taken over by a recovery, or deleted, before it was marked enqueued`);
    }
    await this.unlist(id).catch(() => undefined); // a later recovery unlists a batch it finds enqueued
  }

  /**
   * Up to `limit` batches listed as not enqueued for at least `ageMs` (by Redis's clock), each listed again as of
   * now in the same script, so that concurrent callers do not take the same batch within `ageMs` (relist renews
   * that for each batch as it comes to be handled).
   */
  async takeStranded(ageMs: number, limit: number): Promise<string[]> {
    return (await this.#takeStranded([this.keys.strandedBatches()], [ageMs, limit])) as string[];
  }

  /** Lists a batch taken by takeStranded again as of now, if it is still listed. */
  async relist(id: string): Promise<void> {
    await this.#list([this.keys.strandedBatches()], [id, 1]);
  }

  /**
   * A recovery takes a stranded batch over, unless it is gone or enqueued, or its request began undoing it less
   * than `ageMs` ago (beginUndo; `busy`): from then on its request can no longer mark it enqueued, begin undoing
   * it or delete it (markEnqueued, beginUndo, delete), so the two never both decide.
   */
  async beginRecovery(id: string, ageMs: number): Promise<'ok' | 'gone' | 'enqueued' | 'busy'> {
    return (await this.#beginRecovery([this.keys.batch(id)], [ageMs])) as 'ok' | 'gone' | 'enqueued' | 'busy';
  }

  /**
   * The batch's request takes it back (undoBatch), unless a recovery took it over (`recovering`: the request then
   * leaves it alone); no recovery takes it over for its recovery age from then on. `gone`: nothing recorded.
   */
  async beginUndo(id: string): Promise<'ok' | 'gone' | 'recovering'> {
    return (await this.#beginUndo([this.keys.batch(id)], [])) as 'ok' | 'gone' | 'recovering';
  }

  /** Takes a batch off the list of those not enqueued (its record is gone, or it was enqueued). */
  async unlist(id: string): Promise<void> {
    await this.redis.zrem(this.keys.strandedBatches(), id);
  }

  async get(id: string): Promise<{ batch: BatchRecord; counts: BatchCounts } | undefined> {
    const [[, raw], [, rawCounts]] = (await this.redis
      .multi()
      .hgetall(this.keys.batch(id))
      .hgetall(this.keys.batchCounts(id))
      .exec()) as [[unknown, Record<string, string>], [unknown, Record<string, string>]];
    if (!raw.id) return undefined;
    const counts = emptyCounts();
    for (const [k, v] of Object.entries(rawCounts)) counts[k as JobStatus] = Number(v);
    return { batch: fromHash(raw), counts };
  }

  /** Only the account that owns a batch sees it; an id not of a batch's form (isBatchId) names none. */
  async getOwned(account: string, id: string) {
    if (!isBatchId(id)) return undefined;
    const found = await this.get(id);
    return found && found.batch.account === account ? found : undefined;
  }

  /** A page of the batch's jobs in index order, optionally only those in one status. */
  async page(batch: BatchRecord, status: JobStatus | undefined, cursor: number, limit: number): Promise<{ jobs: JobRecord[]; next: number | null }> {
    let ids: string[];
    if (status) {
      const found = await this.redis.zrangebyscore(this.keys.batchStatusIndex(batch.id, status), cursor, '+inf', 'WITHSCORES', 'LIMIT', 0, limit + 1);
      ids = [];
      const scores: number[] = [];
      for (let i = 0; i < found.length; i += 2) {
        ids.push(found[i] as string);
        scores.push(Number(found[i + 1]));
      }
      const next = ids.length > limit ? (scores[limit] as number) : null;
      ids = ids.slice(0, limit);
      return { jobs: await this.records(ids), next };
    }
    const end = Math.min(batch.total, cursor + limit);
    ids = [];
    for (let i = cursor; i < end; i++) ids.push(`${batch.id}.${i}`);
    return { jobs: await this.records(ids), next: end < batch.total ? end : null };
  }

  /** Ids of the batch's jobs now in `status`. */
  async idsIn(batchId: string, status: JobStatus): Promise<string[]> {
    return this.redis.zrange(this.keys.batchStatusIndex(batchId, status), 0, -1);
  }

  private async records(ids: string[]): Promise<JobRecord[]> {
    if (ids.length === 0) return [];
    const raws = await this.redis.mget(ids.map((id) => this.keys.job(id)));
    return raws.filter((r): r is string => r !== null).map((r) => JSON.parse(r) as JobRecord);
  }
}

function toHash({ recovering: _, ...b }: BatchRecord): Record<string, string | number> {
  return { ...b, finished_at: b.finished_at ?? '', callback_url: b.callback_url ?? '', claim: b.claim ?? '' };
}

function fromHash(h: Record<string, string>): BatchRecord {
  return {
    id: h.id ?? '',
    account: h.account ?? '',
    status: h.status === 'completed' ? 'completed' : 'running',
    total: Number(h.total),
    created_at: h.created_at ?? '',
    updated_at: h.updated_at ?? '',
    finished_at: h.finished_at || null,
    callback_url: h.callback_url || null,
    enqueued: Number(h.enqueued ?? 0),
    completions: Number(h.completions ?? 0),
    ...(h.claim ? { claim: h.claim } : {}),
    ...(h.recovering ? { recovering: true } : {}),
  };
}

/** The time by Redis's clock, in ms (TIME: seconds, microseconds). */
const NOW_MS = `local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)`;
/** Lists batch ARGV[1] in the sorted set KEYS[1] as not enqueued, as of now (ARGV[2] = 1: only if listed). */
const LIST_UNENQUEUED = `${NOW_MS}
if ARGV[2] == '1' then return redis.call('ZADD', KEYS[1], 'XX', now, ARGV[1]) end
return redis.call('ZADD', KEYS[1], now, ARGV[1])`;
/** Sets `enqueued` on the batch hash KEYS[1] if it exists and, unless ARGV[1] = 1 (by the recovery), no recovery took it over. */
const MARK_ENQUEUED = `
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] ~= '1' and redis.call('HEXISTS', KEYS[1], 'recovering') == 1 then return 0 end
redis.call('HSET', KEYS[1], 'enqueued', 1)
redis.call('HDEL', KEYS[1], 'recovering', 'undoing')
return 1`;
/**
 * Marks the batch hash KEYS[1] as taken over by a recovery, unless it is gone or enqueued, or its request began
 * undoing it (`undoing`: when, by Redis's clock) less than ARGV[1] ms ago.
 */
const BEGIN_RECOVERY = `${NOW_MS}
if redis.call('EXISTS', KEYS[1]) == 0 then return 'gone' end
if redis.call('HGET', KEYS[1], 'enqueued') == '1' then return 'enqueued' end
local undoing = tonumber(redis.call('HGET', KEYS[1], 'undoing'))
if undoing and now - undoing < tonumber(ARGV[1]) then return 'busy' end
redis.call('HSET', KEYS[1], 'recovering', 1)
return 'ok'`;
/** Marks the batch hash KEYS[1] as being undone by its request (as of now), unless a recovery took it over. */
const BEGIN_UNDO = `${NOW_MS}
if redis.call('EXISTS', KEYS[1]) == 0 then return 'gone' end
if redis.call('HEXISTS', KEYS[1], 'recovering') == 1 then return 'recovering' end
redis.call('HSET', KEYS[1], 'undoing', now)
return 'ok'`;
/**
 * Deletes KEYS (KEYS[1]: the batch hash, KEYS[2]: its counts) while all ARGV[1] jobs are queued; ARGV[2] = 1 (a
 * recovery): only a batch taken over and not enqueued (0 otherwise); else -1 if a recovery took it over. DEL by
 * 1000 keys (Lua's stack). 1 if deleted, or gone already.
 */
const DELETE_BATCH = `
if redis.call('EXISTS', KEYS[1]) == 1 then
  local recovering = redis.call('HEXISTS', KEYS[1], 'recovering') == 1
  if ARGV[2] == '1' then
    if not recovering or redis.call('HGET', KEYS[1], 'enqueued') == '1' then return 0 end
  elseif recovering then
    return -1
  end
  if tonumber(redis.call('HGET', KEYS[2], 'queued') or '0') ~= tonumber(ARGV[1]) then return 0 end
end
for i = 1, #KEYS, 1000 do redis.call('DEL', unpack(KEYS, i, math.min(i + 999, #KEYS))) end
return 1`;
/** Up to ARGV[2] members of KEYS[1] scored at least ARGV[1] ms ago, each scored now. */
const TAKE_STRANDED = `${NOW_MS}
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]), 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], now, id) end
return ids`;
