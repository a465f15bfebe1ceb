import type { RedisClient } from '../redis.js';
import type { AlongsideSet } from './job-store.js';
import type { Keyspace } from './keyspace.js';

/** An uploaded key, in the spec's response shape, plus the owning account. */
export interface UploadedKey extends Record<string, unknown> {
  id: string;
}

export class UploadedKeyStore {
  constructor(
    private readonly redis: RedisClient,
    private readonly keys: Keyspace,
  ) {}

  /**
   * The Redis key and value of an uploaded key: the worker writes them along with the record of the job that
   * succeeded (JobStore.updateFrom), so that a succeeded job's key can always be read.
   */
  entry(account: string, key: UploadedKey): AlongsideSet {
    return { key: this.keys.uploadedKey(key.id), value: JSON.stringify({ owner: account, key }) };
  }

  async getOwned(account: string, id: string): Promise<UploadedKey | undefined> {
    const raw = await this.redis.get(this.keys.uploadedKey(id));
    if (!raw) return undefined;
    const { owner, key } = JSON.parse(raw) as { owner: string; key: UploadedKey };
    return owner === account ? key : undefined;
  }
}
