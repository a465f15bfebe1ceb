import { Cluster } from 'ioredis';
import { scanKeys, type RedisClient } from '../redis.js';

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

  /**
   * The hash tag of a job's keys: a batch job's id is `<batch id>.<index>`, so all of a batch's records,
   * counters and events share one slot and are updated together in one MULTI.
   */
  static tagOf(id: string): string {
    const dot = id.indexOf('.');
    return dot === -1 ? id : id.slice(0, dot);
  }

  #tagged(kind: string, id: string): string {
    const tag = Keyspace.tagOf(id);
    return `${this.prefix}:${kind}:{${tag}}${tag === id ? '' : `:${id.slice(tag.length + 1)}`}`;
  }

  job(id: string): string {
    return this.#tagged('job', id);
  }

  /** Stream of a job's status and step changes (SSE reads it). */
  jobEvents(id: string): string {
    return `${this.#tagged('job', id)}:events`;
  }

  /** List of webhook delivery attempts for a job or a batch (JSON entries). */
  deliveries(ownerId: string): string {
    return this.#tagged('deliveries', ownerId);
  }

  batch(id: string): string {
    return `${this.prefix}:job:{${id}}:batch`;
  }

  /** Hash of status → number of the batch's jobs in it. */
  batchCounts(id: string): string {
    return `${this.prefix}:job:{${id}}:batch:counts`;
  }

  /** Sorted set (score = item index) of the batch's job ids in one status, for paging by status. */
  batchStatusIndex(id: string, status: string): string {
    return `${this.prefix}:job:{${id}}:batch:status:${status}`;
  }

  /** Stream of a batch's job status changes and its completion (SSE and the CLI read it). */
  batchEvents(id: string): string {
    return `${this.prefix}:job:{${id}}:batch:events`;
  }

  /**
   * Sorted set of batches recorded and not yet enqueued (score: when, in ms by Redis's clock, or when a
   * recovery last looked at one): what Intake.recoverStrandedBatches goes through.
   */
  strandedBatches(): string {
    return `${this.prefix}:batches:unenqueued`;
  }

  /** Hash holding an account's sealed webhook secrets (current, previous + when it stops signing). */
  webhookSecret(account: string): string {
    return `${this.prefix}:acct:{${account}}:webhook-secret`;
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

  /**
   * Callback URLs that answered 410 Gone for an account (skipped from then on), each scored by when it is
   * forgotten (ms). Until 2026-12-08 a set under `webhook-gone`, which is no longer read: a URL listed there is
   * tried once more, and listed here if it answers 410 again.
   */
  webhookGone(account: string): string {
    return `${this.prefix}:acct:{${account}}:webhook-gone-until`;
  }

  /**
   * The request-rate bucket of one KMS operation in one AWS account and region, shared by every worker. All
   * operations of an account and region share a hash tag; the bucket's keys start with this one.
   */
  kmsQuota(awsAccountId: string, region: string, op: string): string {
    return `${this.prefix}:quota:{${awsAccountId}:${region}}:${op}`;
  }

  /** Token bucket of an account's intake requests (see api/rate-limit.ts). */
  rateLimit(account: string): string {
    return `${this.prefix}:acct:{${account}}:ratelimit`;
  }

  /** Match patterns covering everything under this prefix (tests clean up with them). */
  get patterns(): string[] {
    return [`${this.prefix}:*`, `${this.bullPrefix}:*`];
  }
}

/** Deletes every key under a prefix with SCAN + UNLINK (never FLUSHALL: a Redis may be shared); on a Cluster, on every master. */
export async function deleteKeyspace(redis: RedisClient, prefix: string): Promise<void> {
  for (const pattern of new Keyspace(prefix).patterns) {
    const keys = await scanKeys(redis, pattern);
    // A Cluster takes one slot per command: there, each key goes on its own.
    const perCommand = redis instanceof Cluster ? 1 : 1000;
    const unlinks: Promise<number>[] = [];
    for (let i = 0; i < keys.length; i += perCommand) unlinks.push(redis.unlink(...keys.slice(i, i + perCommand)));
    await Promise.all(unlinks);
  }
}
