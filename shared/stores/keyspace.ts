import type { Redis } from 'ioredis';

/**
 * Every Redis key keyferry writes outside BullMQ. Keys that a MULTI touches together share a hash tag
 * (the account or the record id), so the layout works on Redis Cluster.
 */
export class Keyspace {
  constructor(readonly prefix: string) {}

  /** BullMQ's prefix: one hash tag for the queue's keys. */
  get bullPrefix(): string {
    return `{${this.prefix}}`;
  }

  job(id: string): string {
    return `${this.prefix}:job:{${id}}`;
  }

  uploadedKey(id: string): string {
    return `${this.prefix}:key:{${id}}`;
  }

  /** Hash of id → JSON record for one kind of account resource. */
  resources(account: string, kind: string): string {
    return `${this.prefix}:acct:{${account}}:${kind}`;
  }

  /** Hash of name → id for the same kind, in the same slot. */
  resourceNames(account: string, kind: string): string {
    return `${this.prefix}:acct:{${account}}:${kind}:names`;
  }

  idempotency(account: string, keyHash: string): string {
    return `${this.prefix}:acct:{${account}}:idem:${keyHash}`;
  }

  /** Match patterns covering everything under this prefix (tests clean up with them). */
  get patterns(): string[] {
    return [`${this.prefix}:*`, `${this.bullPrefix}:*`];
  }
}

/** Deletes every key under a prefix with SCAN + UNLINK (never FLUSHALL: a Redis may be shared). */
export async function deleteKeyspace(redis: Redis, prefix: string): Promise<void> {
  for (const pattern of new Keyspace(prefix).patterns) {
    let cursor = '0';
    do {
      const [next, keys] = await redis.scan(cursor, 'MATCH', pattern, 'COUNT', 1000);
      cursor = next;
      if (keys.length > 0) await redis.unlink(...keys);
    } while (cursor !== '0');
  }
}
