import { emptyCounts, isBatchId, type BatchCounts, type BatchRecord } from '../batches.js';
import { JOB_STATUSES, type JobRecord, type JobStatus } from '../jobs.js';
import type { RedisClient } from '../redis.js';
import type { Keyspace } from './keyspace.js';

/**
 * Batches: the batch hash, its counts hash and per-status indexes, and its jobs' records all share the
 * batch id's hash tag, so a batch and all its job records are written in one MULTI.
 */
export class BatchStore {
  constructor(
    private readonly redis: RedisClient,
    private readonly keys: Keyspace,
  ) {}

  /** Records a batch and every job record at once: all or nothing. */
  async create(batch: BatchRecord, jobs: JobRecord[]): Promise<void> {
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
  }

  /**
   * Deletes a batch and its jobs' records and event streams (undoBatch: a batch whose enqueue failed). All share
   * the batch's hash tag, so each DEL names many keys, also on a Redis Cluster.
   */
  async delete(id: string, total: number): Promise<void> {
    const keys = [this.keys.batch(id), this.keys.batchCounts(id), this.keys.batchEvents(id), ...JOB_STATUSES.map((s) => this.keys.batchStatusIndex(id, s))];
    for (let i = 0; i < total; i++) keys.push(this.keys.job(`${id}.${i}`), this.keys.jobEvents(`${id}.${i}`));
    const multi = this.redis.multi();
    for (let i = 0; i < keys.length; i += 1000) multi.del(...keys.slice(i, i + 1000));
    const failed = (await multi.exec())?.find(([err]) => err);
    if (failed) throw failed[0];
  }

  async markEnqueued(id: string): Promise<void> {
    await this.redis.hset(this.keys.batch(id), 'enqueued', 1);
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

function toHash(b: BatchRecord): Record<string, string | number> {
  return { ...b, finished_at: b.finished_at ?? '', callback_url: b.callback_url ?? '' };
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
  };
}
