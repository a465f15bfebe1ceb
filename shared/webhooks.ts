import { Queue } from 'bullmq';
import { sha256Hex } from './crypto.js';
import type { RedisClient } from './redis.js';
import type { Keyspace } from './stores/keyspace.js';
import { bullTelemetry } from './tracing.js';

/** The webhook contract between the producers (the upload worker), the webhook worker and the API. */
export const WEBHOOK_QUEUE = 'webhook';

/** The backoff type webhook jobs carry; the webhook worker's `backoffStrategy` computes its delays. */
export const WEBHOOK_BACKOFF = 'webhook-schedule';

export type WebhookEventType = 'upload-key.succeeded' | 'upload-key.failed' | 'batch.completed';

export interface WebhookEvent {
  type: WebhookEventType;
  account: string;
  url: string;
  /** Job id or batch id: whose deliveries list records the attempts. */
  ownerId: string;
  /** The job resource or the batch resource. */
  data: unknown;
  /** Stable: the same event enqueued twice is delivered once. */
  dedupeId: string;
}

/** The BullMQ payload: the message exactly as it is signed and sent at every attempt. Never a secret. */
export interface WebhookJobData {
  /** The `webhook-id` header, also the BullMQ job id. */
  msgId: string;
  type: WebhookEventType;
  account: string;
  url: string;
  ownerId: string;
  /** JSON `{type, timestamp, data}`. */
  body: string;
}

export type WebhookQueue = Queue<WebhookJobData>;

/**
 * BullMQ's attempt ceiling. The worker stops earlier, when its WEBHOOK_RETRY_SCHEDULE is used up: it owns
 * the schedule because it must know which attempt is the last one to record `next_attempt_at: null`.
 */
const ATTEMPTS_CEILING = 1000;

export function createWebhookQueue(redis: RedisClient, keys: Keyspace): WebhookQueue {
  return new Queue<WebhookJobData>(WEBHOOK_QUEUE, { connection: redis, prefix: keys.bullPrefix, ...bullTelemetry() });
}

/** Same dedupe id, same `webhook-id` (`msg_` + 32 hex). */
export function webhookMessageId(dedupeId: string): string {
  return `msg_${sha256Hex(dedupeId).slice(0, 32)}`;
}

/**
 * Queues one event for delivery. The job id is the message id, so enqueueing an event again while its job
 * is kept (pending, then one day after delivery) is a no-op.
 */
export async function enqueueWebhook(queue: WebhookQueue, event: WebhookEvent): Promise<void> {
  const msgId = webhookMessageId(event.dedupeId);
  const body = JSON.stringify({ type: event.type, timestamp: new Date().toISOString(), data: event.data });
  await queue.add(
    event.type,
    { msgId, type: event.type, account: event.account, url: event.url, ownerId: event.ownerId, body },
    {
      jobId: msgId,
      attempts: ATTEMPTS_CEILING,
      backoff: { type: WEBHOOK_BACKOFF },
      removeOnComplete: { age: 86_400 },
      removeOnFail: { age: 7 * 86_400 },
    },
  );
}

export type DeliveryOutcome = 'delivered' | 'failed' | 'gone' | 'forbidden' | 'skipped';

/** One delivery attempt, as `GET /api/v1/jobs/{id}/deliveries` shows it. */
export interface DeliveryRecord {
  /** The `webhook-id`. */
  id: string;
  event_type: WebhookEventType;
  url: string;
  attempt: number;
  at: string;
  status_code: number | null;
  latency_ms: number;
  outcome: DeliveryOutcome;
  error: string | null;
  next_attempt_at: string | null;
}

/** How long a gone URL is remembered after its last 410. */
const GONE_TTL_MS = 30 * 86_400_000;
/** At most this many gone URLs are listed (those forgotten last first, then sorted). */
const GONE_LIST_MAX = 1000;

/**
 * URLs that answered 410 Gone, per account: later events to them are skipped, not sent, until the account
 * clears one (DELETE /api/v1/webhooks/gone) or 30 days pass without another 410 from it. A sorted set, each
 * URL scored by when it is forgotten; adding one drops those already forgotten.
 */
export class GoneUrls {
  constructor(
    private readonly redis: RedisClient,
    private readonly keys: Keyspace,
  ) {}

  #key(account: string): string {
    return this.keys.webhookGone(account);
  }

  async has(account: string, url: string): Promise<boolean> {
    const until = await this.redis.zscore(this.#key(account), url);
    return until !== null && Number(until) > Date.now();
  }

  async add(account: string, url: string): Promise<void> {
    const key = this.#key(account);
    const now = Date.now();
    await this.redis.multi().zadd(key, now + GONE_TTL_MS, url).zremrangebyscore(key, '-inf', now).pexpire(key, GONE_TTL_MS).exec();
  }

  /** The account's gone URLs not yet forgotten, sorted; at most GONE_LIST_MAX. */
  async list(account: string): Promise<string[]> {
    const urls = await this.redis.zrevrangebyscore(this.#key(account), '+inf', `(${Date.now()}`, 'LIMIT', 0, GONE_LIST_MAX);
    return urls.sort();
  }

  /** Forgets one; false if it was not listed (or was already forgotten: its 30 days are over). */
  async remove(account: string, url: string): Promise<boolean> {
    const key = this.#key(account);
    const [, removed] = (await this.redis.multi().zremrangebyscore(key, '-inf', Date.now()).zrem(key, url).exec()) ?? [];
    if (removed?.[0]) throw removed[0];
    return removed?.[1] === 1;
  }
}

/** The deliveries list of a job or a batch: oldest first, the last 1000 attempts, kept 30 days after the last one. */
export class WebhookDeliveries {
  static readonly MAX_ENTRIES = 1000;
  static readonly TTL_SECONDS = 30 * 86_400;

  constructor(
    private readonly redis: RedisClient,
    private readonly keys: Keyspace,
  ) {}

  async append(ownerId: string, record: DeliveryRecord): Promise<void> {
    const key = this.keys.deliveries(ownerId);
    await this.redis
      .multi()
      .rpush(key, JSON.stringify(record))
      .ltrim(key, -WebhookDeliveries.MAX_ENTRIES, -1)
      .expire(key, WebhookDeliveries.TTL_SECONDS)
      .exec();
  }

  async list(ownerId: string): Promise<DeliveryRecord[]> {
    const raw = await this.redis.lrange(this.keys.deliveries(ownerId), 0, -1);
    return raw.map((r) => JSON.parse(r) as DeliveryRecord);
  }
}
