import type { RedisClient } from '../redis.js';
import type { JobRecord } from '../jobs.js';
import type { Keyspace } from './keyspace.js';

/** Job records, one JSON string per job, keyed by job id. */
export class JobStore {
  constructor(
    private readonly redis: RedisClient,
    private readonly keys: Keyspace,
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
  async update(id: string, change: (job: JobRecord) => void): Promise<JobRecord> {
    const job = await this.get(id);
    if (!job) throw new Error(`job record ${id} is missing`);
    change(job);
    job.updated_at = new Date().toISOString();
    await this.redis.set(this.keys.job(id), JSON.stringify(job));
    return job;
  }

  async delete(id: string): Promise<void> {
    await this.redis.del(this.keys.job(id));
  }
}
