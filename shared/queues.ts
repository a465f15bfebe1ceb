import { Queue, QueueEvents, type JobsOptions } from 'bullmq';
import type { Config } from './config.js';
import { UPLOAD_QUEUE, type UploadJobData } from './jobs.js';
import type { RedisClient } from './redis.js';
import type { Keyspace } from './stores/keyspace.js';
import { bullTelemetry } from './tracing.js';

export type UploadQueue = Queue<UploadJobData>;

/** The backoff type of upload jobs; the upload worker's `backoffStrategy` (below) computes its delays. */
export const UPLOAD_BACKOFF = 'capped-exponential';

/**
 * Delay before retry n (n = attempts made so far): JOB_BACKOFF_MS × 2^(n-1), capped at JOB_BACKOFF_MAX_MS,
 * with ±50 % jitter so that jobs failed together do not retry together.
 */
export function uploadBackoffDelay(attemptsMade: number, config: Pick<Config, 'JOB_BACKOFF_MS' | 'JOB_BACKOFF_MAX_MS'>, random = Math.random()): number {
  const base = Math.min(config.JOB_BACKOFF_MAX_MS, config.JOB_BACKOFF_MS * 2 ** Math.max(0, attemptsMade - 1));
  return Math.round(base * (0.5 + random));
}

/** Retries: capped exponential backoff with jitter; finished BullMQ jobs are trimmed (the job record stays). */
export function uploadJobOptions(config: Pick<Config, 'JOB_ATTEMPTS' | 'JOB_BACKOFF_MS'>): JobsOptions {
  return {
    attempts: config.JOB_ATTEMPTS,
    backoff: { type: UPLOAD_BACKOFF, delay: config.JOB_BACKOFF_MS },
    removeOnComplete: { age: 3600, count: 10_000 },
    removeOnFail: { age: 7 * 86_400, count: 100_000 },
  };
}

export function createUploadQueue(redis: RedisClient, keys: Keyspace): UploadQueue {
  return new Queue<UploadJobData>(UPLOAD_QUEUE, { connection: redis, prefix: keys.bullPrefix, ...bullTelemetry() });
}

/**
 * QueueEvents reads on a connection BullMQ makes for it, a copy of `redis`, and closes with it (closeQueueEvents):
 * pass a client made with `lazyConnect`, which never connects itself. It reads the events after `lastEventId`
 * (default: those added after its first read), from now on unless `autorun` is false.
 */
export function createUploadQueueEvents(redis: RedisClient, keys: Keyspace, opts: { lastEventId?: string; autorun?: boolean } = {}): QueueEvents {
  return new QueueEvents(UPLOAD_QUEUE, { connection: redis, prefix: keys.bullPrefix, ...opts });
}

/**
 * Stops a QueueEvents and drops its connection at once, also while Redis is away: QueueEvents.close() alone then
 * waits until Redis is back, and its read loop and reconnects go on meanwhile.
 */
export async function closeQueueEvents(events: QueueEvents): Promise<void> {
  events.close().catch(() => undefined); // ends the read loop once its read fails, when the connection below is down
  await events.getBackend().close(true);
}
