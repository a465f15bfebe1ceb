import type { Queue } from 'bullmq';
import type { Stores } from '../shared/context.js';
import { mayHaveMadeKey, type JobRecord } from '../shared/jobs.js';
import { jobsFinished } from '../shared/metrics.js';
import type { Notifier } from '../shared/notifier.js';
import type { JobUpdate } from '../shared/stores/job-store.js';

/**
 * Cancels a queued job that has not started (DELETE of a job, or of its batch). The record decides first: its
 * status is set to `canceled` only while it is still `queued` (a compare-and-set inside the write script), and
 * the worker's start write, from the record it read, is a compare-and-set too, so exactly one of the two wins;
 * a worker that loses does nothing with the job. Only a job whose record was canceled is then taken out of the
 * queue, last (`inQueue`; a batch never enqueued has nothing there). A job whose record moved on keeps its
 * BullMQ job: a worker started it, and it may now wait in BullMQ's delayed set for its retry. remove() refuses
 * a job a worker holds (its lock); that worker reads the canceled record and does nothing with it.
 *
 * `key_made`: an earlier run made the job's AWS key (a batch job retry-failed set back to queued keeps its
 * checkpoints); it is not canceled, since nothing would then finish or clean up that key: it runs to its end.
 * `started`: the record is no longer queued (a worker's start write won).
 */
export async function cancelQueuedJob(
  deps: { stores: Stores; queue: Queue; notifier: Notifier },
  job: JobRecord,
  inQueue = true,
): Promise<JobUpdate | 'key_made' | 'started'> {
  if (mayHaveMadeKey(job.progress)) return 'key_made';
  const update = await deps.stores.jobs.updateIf(job.id, 'queued', (j) => {
    j.status = 'canceled';
    j.finished_at = new Date().toISOString();
  });
  if (!update) return 'started';
  jobsFinished.inc({ status: 'canceled', code: '' });
  await deps.notifier.after(update);
  if (inQueue) await deps.queue.remove(update.job.queue_job_id);
  return update;
}
