import { z } from 'zod';
import { isJobId, JOB_STATUSES, type JobStatus } from './jobs.js';

export const MAX_BATCH_ITEMS = 10_000;
/** BullMQ priority of batch jobs: single uploads carry none, and BullMQ serves those first. */
export const BATCH_PRIORITY = 100;
/** BullMQ priority of a batch job put back to wait for a KMS slot it reserved: before batch jobs not started yet. */
export const RESUMED_BATCH_PRIORITY = 1;

/** Whether `id` has the form of a batch id: a job id's (isJobId) without an item index; no other reaches a Redis key. */
export function isBatchId(id: string): boolean {
  return isJobId(id) && !id.includes('.');
}

export const batchBodySchema = z.strictObject({
  items: z.array(z.unknown()).min(1).max(MAX_BATCH_ITEMS),
  callback_url: z.url({ protocol: /^https?$/, message: 'Must be an http(s) URL.' }).max(2048).optional(),
});

/** The batch record: a Redis hash; counts live in their own hash, updated with each job's status. */
export interface BatchRecord {
  id: string;
  account: string;
  status: 'running' | 'completed';
  total: number;
  created_at: string;
  updated_at: string;
  finished_at: string | null;
  callback_url: string | null;
  /** 1 once every job is in BullMQ; a crash between recording and enqueueing leaves 0 (see Intake). */
  enqueued: number;
  completions: number;
  /** The Redis key of the Idempotency-Key claim it was posted with, if any (a recovery leaves it to a retry). */
  claim?: string;
  /** A recovery took it over (BatchStore.beginRecovery): its request no longer undoes or enqueues it. */
  recovering?: boolean;
}

export type BatchCounts = Record<JobStatus, number>;

export const emptyCounts = (): BatchCounts => Object.fromEntries(JOB_STATUSES.map((s) => [s, 0])) as BatchCounts;

export function batchResource(b: BatchRecord, counts: BatchCounts) {
  return {
    id: b.id,
    status: b.status,
    total: b.total,
    counts,
    created_at: b.created_at,
    updated_at: b.updated_at,
    finished_at: b.finished_at,
    callback_url: b.callback_url,
  };
}
