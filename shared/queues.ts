import { Queue, QueueEvents, type JobsOptions } from 'bullmq';
import type { Config } from './config.js';
import { UPLOAD_QUEUE, type UploadJobData } from './jobs.js';
import type { RedisClient } from './redis.js';
import type { Keyspace } from './stores/keyspace.js';

export type UploadQueue = Queue<UploadJobData>;

/** Retries: exponential backoff with jitter; finished BullMQ jobs are trimmed (the job record stays). */
export function uploadJobOptions(config: Pick<Config, 'JOB_ATTEMPTS' | 'JOB_BACKOFF_MS'>): JobsOptions {
  return {
    attempts: config.JOB_ATTEMPTS,
    backoff: { type: 'exponential', delay: config.JOB_BACKOFF_MS, jitter: 0.5 },
    removeOnComplete: { age: 3600, count: 10_000 },
    removeOnFail: { age: 7 * 86_400, count: 100_000 },
  };
}

export function createUploadQueue(redis: RedisClient, keys: Keyspace): UploadQueue {
  return new Queue<UploadJobData>(UPLOAD_QUEUE, { connection: redis, prefix: keys.bullPrefix });
}

/** QueueEvents blocks on a stream read: give it a client of its own (the caller disconnects it). */
export function createUploadQueueEvents(redis: RedisClient, keys: Keyspace): QueueEvents {
  return new QueueEvents(UPLOAD_QUEUE, { connection: redis, prefix: keys.bullPrefix });
}
