import { batchResource } from './batches.js';
import type { Stores } from './context.js';
import { jobResource, type JobRecord } from './jobs.js';
import type { JobUpdate } from './stores/job-store.js';
import type { WebhookEvent } from './webhooks.js';

/**
 * Turns finished jobs and completed batches into webhook events. Dedupe ids are derived from the final
 * state, so notifying twice (a worker that crashed after writing the state and is run again) delivers once.
 */
export class Notifier {
  constructor(
    private readonly stores: Stores,
    private readonly enqueue: (event: WebhookEvent) => Promise<void>,
  ) {}

  async after(update: JobUpdate): Promise<void> {
    await this.jobFinished(update.job);
    if (update.batchCompletion > 0 && update.job.batch_id) await this.batchCompleted(update.job.account, update.job.batch_id, update.batchCompletion);
  }

  async jobFinished(job: JobRecord): Promise<void> {
    if ((job.status !== 'succeeded' && job.status !== 'failed') || !job.callback_url) return;
    await this.enqueue({
      type: job.status === 'succeeded' ? 'upload-key.succeeded' : 'upload-key.failed',
      account: job.account,
      url: job.callback_url,
      ownerId: job.id,
      data: jobResource(job),
      dedupeId: `job:${job.id}:${job.status}:${job.finished_at ?? ''}`,
    });
  }

  /** `completion` is the batch's completion number that the event is for (default: its latest). */
  async batchCompleted(account: string, batchId: string, completion?: number): Promise<void> {
    const found = await this.stores.batches.get(batchId);
    if (!found || found.batch.completions === 0 || !found.batch.callback_url) return;
    await this.enqueue({
      type: 'batch.completed',
      account,
      url: found.batch.callback_url,
      ownerId: batchId,
      data: batchResource(found.batch, found.counts),
      dedupeId: `batch:${batchId}:completed:${completion ?? found.batch.completions}`,
    });
  }
}
