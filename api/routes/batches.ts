import { Router } from 'express';
import { z } from 'zod';
import { BATCH_PRIORITY, batchResource } from '../../shared/batches.js';
import type { Stores } from '../../shared/context.js';
import { NotFoundError } from '../../shared/errors.js';
import { JOB_STATUSES, jobResource } from '../../shared/jobs.js';
import type { Notifier } from '../../shared/notifier.js';
import { uploadJobOptions, type UploadQueue } from '../../shared/queues.js';
import type { RedisClient } from '../../shared/redis.js';
import type { Config } from '../../shared/config.js';
import { parseOrThrow } from '../../shared/validation.js';
import { accountOf } from '../auth.js';
import { cancelQueuedJob } from '../cancel.js';
import type { Intake } from '../intake.js';
import { streamEvents, type StreamLimit } from '../sse.js';
import { RETRY_AFTER_SECONDS } from './upload-key.js';

export const pageQuery = z.strictObject({
  status: z.enum(JOB_STATUSES).optional(),
  cursor: z.coerce.number().int().min(0).default(0),
  limit: z.coerce.number().int().min(1).max(1000).default(100),
});

/** Runs `fn` over `items`, `width` at a time. */
async function inChunks<T>(items: T[], width: number, fn: (item: T) => Promise<void>): Promise<void> {
  for (let i = 0; i < items.length; i += width) await Promise.all(items.slice(i, i + width).map(fn));
}

export function batchRoutes(deps: {
  config: Config;
  intake: Intake;
  stores: Stores;
  queue: UploadQueue;
  redis: RedisClient;
  notifier: Notifier;
  keepAliveMs: number;
  streamLimit: StreamLimit;
}): Router {
  const { stores } = deps;
  const router = Router();
  const owned = async (account: string, id: string) => {
    const found = await stores.batches.getOwned(account, id);
    if (!found) throw new NotFoundError(`The batch "${id}"`);
    return found;
  };

  router.post('/api/v1/cckm/aws/upload-key/batch', async (req, res) => {
    const account = accountOf(req);
    const { batchId } = await deps.intake.submitBatch(account, req.body, req.get('idempotency-key'));
    const { batch, counts } = await owned(account, batchId);
    res.status(202).location(`/api/v1/batches/${batchId}`).setHeader('Retry-After', String(RETRY_AFTER_SECONDS)).json(batchResource(batch, counts));
  });

  router.get('/api/v1/batches/:id', async (req, res) => {
    const { batch, counts } = await owned(accountOf(req), req.params.id);
    res.json(batchResource(batch, counts));
  });

  router.get('/api/v1/batches/:id/jobs', async (req, res) => {
    const { batch } = await owned(accountOf(req), req.params.id);
    const q = parseOrThrow(pageQuery, req.query);
    const { jobs, next } = await stores.batches.page(batch, q.status, q.cursor, q.limit);
    res.json({ jobs: jobs.map(jobResource), next_cursor: next === null ? null : String(next) });
  });

  /**
   * Re-enqueues the failed jobs. Each move failed → queued is a compare-and-set, so concurrent calls
   * retry a job once. Queued jobs whose BullMQ job is missing (an earlier call failed between the two
   * writes) are enqueued again. Each job resumes from its checkpoints; one whose key was scheduled for
   * deletion starts over. The batch is `running` again from the first move (the job-write script reopens a
   * completed batch when a job leaves its final status), so that the jobs' ends complete it again; a call
   * that moves nothing (the failed jobs' records expired, or another call moved them) leaves it completed, and
   * a cancel of a moved job that ends the batch again completes it.
   */
  router.post('/api/v1/batches/:id/retry-failed', async (req, res) => {
    const account = accountOf(req);
    const { batch } = await owned(account, req.params.id);
    const failed = await stores.batches.idsIn(batch.id, 'failed');
    const moved: { id: string; queueJobId: string }[] = [];
    const run = Date.now().toString(36);
    await inChunks(await stores.batches.idsIn(batch.id, 'queued'), 100, async (id) => {
      const job = await stores.jobs.get(id);
      if (job && batch.enqueued && !(await deps.queue.getJob(job.queue_job_id))) moved.push({ id, queueJobId: job.queue_job_id });
    });
    await inChunks(failed, 100, async (id) => {
      const update = await stores.jobs.updateIf(id, 'failed', (j) => {
        j.status = 'queued';
        j.step = null;
        j.error = null;
        j.finished_at = null;
        j.attempts = 0;
        j.queue_job_id = `${id}-r${run}`;
        if (j.progress.deletion_scheduled_for) j.progress = {};
      });
      if (update) moved.push({ id, queueJobId: update.job.queue_job_id });
    });
    await deps.queue.addBulk(
      moved.map(({ id, queueJobId }) => ({ name: 'upload-key', data: { jobId: id, account }, opts: { ...uploadJobOptions(deps.config), priority: BATCH_PRIORITY, jobId: queueJobId } })),
    );
    const after = await owned(account, batch.id);
    res.status(202).location(`/api/v1/batches/${batch.id}`).json({ ...batchResource(after.batch, after.counts), retried: moved.length });
  });

  /** Cancels the jobs no worker has started; running ones finish. */
  router.delete('/api/v1/batches/:id', async (req, res) => {
    const account = accountOf(req);
    const { batch } = await owned(account, req.params.id);
    const queued = await stores.batches.idsIn(batch.id, 'queued');
    let canceled = 0;
    await inChunks(queued, 100, async (id) => {
      const job = await stores.jobs.get(id);
      if (!job) return;
      // A batch never enqueued (enqueued=0) has nothing in the queue. A job that started, or whose earlier run
      // made its key, runs to its end.
      const outcome = await cancelQueuedJob(deps, job, batch.enqueued > 0);
      if (outcome !== 'started' && outcome !== 'key_made') canceled++;
    });
    const after = await owned(account, batch.id);
    res.json({ ...batchResource(after.batch, after.counts), canceled });
  });

  router.get('/api/v1/batches/:id/events', async (req, res) => {
    const account = accountOf(req);
    const { batch } = await owned(account, req.params.id);
    const resource = async () => {
      const now = await owned(account, batch.id);
      return JSON.stringify(batchResource(now.batch, now.counts));
    };
    await streamEvents(req, res, {
      redis: deps.redis,
      account,
      limit: deps.streamLimit,
      streamKey: stores.keys.batchEvents(batch.id),
      keepAliveMs: deps.keepAliveMs,
      snapshot: async (lastId) => {
        const data = await resource();
        const events = [{ id: lastId, event: 'snapshot', data }];
        if ((JSON.parse(data) as { status: string }).status === 'completed') events.push({ id: lastId, event: 'completed', data });
        return events;
      },
      map: async (e) => (e.event === 'completed' ? { ...e, data: await resource() } : e),
      isFinal: (e) => e.event === 'completed',
    });
  });

  return router;
}
