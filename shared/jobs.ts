import { randomUUID } from 'node:crypto';
import type { UploadKeyRequest } from './schemas/upload-key.js';

export const UPLOAD_QUEUE = 'upload-key';

export const JOB_STATUSES = ['queued', 'running', 'retrying', 'succeeded', 'failed', 'canceled'] as const;
export type JobStatus = (typeof JOB_STATUSES)[number];
export const FINAL_STATUSES: readonly JobStatus[] = ['succeeded', 'failed', 'canceled'];

export const STEPS = ['resolve', 'create_key', 'create_alias', 'get_import_params', 'wrap', 'import', 'describe', 'record'] as const;
export type Step = (typeof STEPS)[number];

/** The BullMQ payload: only ids. Everything else, and never key material, lives in the job record. */
export interface UploadJobData {
  jobId: string;
  account: string;
}

export interface JobError {
  code: string;
  message: string;
  retryable: boolean;
}

/** What a retry needs to resume instead of repeating a side effect. */
export interface JobProgress {
  /** Set before CreateKey is sent: with no kms_key_id, a later attempt looks for the key by its job tag. */
  create_key_started_at?: string;
  kms_key_id?: string;
  kms_key_arn?: string;
  alias_created?: boolean;
  import_params?: { public_key: string; import_token: string; valid_to: string; algorithm: string; key_spec: string };
  imported?: boolean;
  deletion_scheduled_for?: string;
  /** Id of the uploaded-key resource, fixed before it is written, so a repeated record step rewrites it. */
  resource_id?: string;
}

/** The job record in the status store: the source of truth clients poll. */
export interface JobRecord {
  id: string;
  type: 'upload-key';
  account: string;
  status: JobStatus;
  step: Step | null;
  attempts: number;
  max_attempts: number;
  created_at: string;
  updated_at: string;
  finished_at: string | null;
  batch_id: string | null;
  /** Position in its batch (the `<index>` of `<batch id>.<index>`), or null for a single upload. */
  batch_index: number | null;
  error: JobError | null;
  result: Record<string, unknown> | null;
  request: UploadKeyRequest;
  kms_id: string;
  callback_url: string | null;
  /** The BullMQ job now carrying this record (`<id>` at first, `<id>-r<n>` after a retry-failed). */
  queue_job_id: string;
  progress: JobProgress;
  /**
   * A random id of the write that stored this record (JobStore): a write sent again after a lost answer finds
   * its own id stored, while another writer's write, even one with otherwise identical JSON, does not; and a
   * write from a held record checks that the stored one still has the held id. Records written before there
   * were ids have none.
   */
  write_id?: string;
}

/**
 * The form of every job id: a UUID, or `<batch id>.<index>` for a batch's job (looser, for records written by
 * tests). An id of another form names no job, and must never reach a Redis key: `<job id>.events` would be
 * the key of that job's event stream, and `<batch id>.batch` that of its batch.
 */
const JOB_ID_RE = /^[A-Za-z0-9-]{1,64}(?:\.\d{1,6})?$/;

/** Whether `id` has the form of a job id (the API answers 404 for any other without asking Redis). */
export function isJobId(id: string): boolean {
  return JOB_ID_RE.test(id);
}

/** A new job record, status `queued`. */
export function newJobRecord(args: { id: string; account: string; request: UploadKeyRequest; kmsId: string; maxAttempts: number; batch?: { id: string; index: number } }): JobRecord {
  const now = new Date().toISOString();
  return {
    id: args.id,
    type: 'upload-key',
    account: args.account,
    status: 'queued',
    step: null,
    attempts: 0,
    max_attempts: args.maxAttempts,
    created_at: now,
    updated_at: now,
    finished_at: null,
    batch_id: args.batch?.id ?? null,
    batch_index: args.batch?.index ?? null,
    error: null,
    result: null,
    request: args.request,
    kms_id: args.kmsId,
    callback_url: args.request.callback_url ?? null,
    queue_job_id: args.id,
    progress: {},
    write_id: randomUUID(),
  };
}

/**
 * Whether a run of the job may have made its AWS key: the record names it, or holds the intent recorded before
 * CreateKey (a run may have died or timed out before recording the key it made).
 */
export function mayHaveMadeKey(p: JobProgress): boolean {
  return Boolean(p.kms_key_id || p.create_key_started_at);
}

/** The job resource of the HTTP API (DESIGN.md §3). */
export function jobResource(job: JobRecord) {
  return {
    id: job.id,
    type: job.type,
    status: job.status,
    step: job.step,
    attempts: job.attempts,
    max_attempts: job.max_attempts,
    created_at: job.created_at,
    updated_at: job.updated_at,
    finished_at: job.finished_at,
    batch_id: job.batch_id,
    ...(job.batch_index !== null ? { batch_index: job.batch_index } : {}),
    error: job.error,
    result: job.result,
    kms_key_arn: job.progress.kms_key_arn ?? null,
    deletion_scheduled_for: job.progress.deletion_scheduled_for ?? null,
  };
}
