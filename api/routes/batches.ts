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
import type { Intake } from '../intake.js';
import { streamEvents } from '../sse.js';
import { RETRY_AFTER_SECONDS } from './upload-key.js';

const pageQuery = z.strictObject({
  status: z.enum(JOB_STATUSES).optional(),
  cursor: z.coerce.number().int().min(0).default(0),
  limit: z.coerce.number().int().min(1).max(1000).default(100),
});

/** Runs `fn` over `items`, `width` at a time. */
async function inChunks<T>(items: T[], width: number, fn: (item: T) => Promise<void>): Promise<void> {
  for (let i = 0; i < items.length; i += width) await Promise.all(items.slice(i, i + width).map(fn));
}

export function batchRoutes(deps: { config: Config; intake: Intake; stores: Stores; queue: UploadQueue; redis: RedisClient; notifier: Notifier; keepAliveMs: number }): Router {
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

  /** Re-enqueues the failed jobs. Each resumes from its checkpoints; a job whose key was scheduled for deletion starts over with a new key. */
  router.post('/api/v1/batches/:id/retry-failed', async (req, res) => {
    const account = accountOf(req);
    const { batch } = await owned(account, req.params.id);
    const failed = await stores.batches.idsIn(batch.id, 'failed');
    if (failed.length > 0) await stores.batches.reopen(batch.id);
    const stamp = Date.now().toString(36);
    await inChunks(failed, 100, async (id) => {
      await stores.jobs.update(id, (j) => {
        j.status = 'queued';
        j.step = null;
        j.error = null;
        j.finished_at = null;
        j.attempts = 0;
        if (j.progress.deletion_scheduled_for) j.progress = {};
      });
    });
    await deps.queue.addBulk(
      failed.map((id) => ({ name: 'upload-key', data: { jobId: id, account }, opts: { ...uploadJobOptions(deps.config), priority: BATCH_PRIORITY, jobId: `${id}-retry-${stamp}` } })),
    );
    const after = await owned(account, batch.id);
    res.status(202).location(`/api/v1/batches/${batch.id}`).json({ ...batchResource(after.batch, after.counts), retried: failed.length });
  });

  /** Cancels the jobs no worker has started; running ones finish. */
  router.delete('/api/v1/batches/:id', async (req, res) => {
    const account = accountOf(req);
    const { batch } = await owned(account, req.params.id);
    const queued = await stores.batches.idsIn(batch.id, 'queued');
    let canceled = 0;
    await inChunks(queued, 100, async (id) => {
      if ((await deps.queue.remove(id)) !== 1) return; // started meanwhile, or already gone
      const update = await stores.jobs.update(id, (j) => {
        j.status = 'canceled';
        j.finished_at = new Date().toISOString();
      });
      canceled++;
      await deps.notifier.after(update);
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
