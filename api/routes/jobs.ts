import { Router } from 'express';
import type { Queue } from 'bullmq';
import type { Stores } from '../../shared/context.js';
import { ConflictError, NotFoundError } from '../../shared/errors.js';
import { FINAL_STATUSES, jobResource, mayHaveMadeKey, type JobStatus } from '../../shared/jobs.js';
import { jobsFinished } from '../../shared/metrics.js';
import type { Notifier } from '../../shared/notifier.js';
import type { RedisClient } from '../../shared/redis.js';
import { streamEvents, type SseEvent } from '../sse.js';
import { accountOf } from '../auth.js';

export function jobRoutes(deps: { stores: Stores; queue: Queue; redis: RedisClient; notifier: Notifier; keepAliveMs: number }): Router {
  const router = Router();

  router.get('/api/v1/jobs/:id', async (req, res) => {
    const job = await deps.stores.jobs.getOwned(accountOf(req), req.params.id);
    if (!job) throw new NotFoundError(`The job "${req.params.id}"`);
    res.json(jobResource(job));
  });

  /** Cancels a job no worker has started: it is removed from the queue, then marked canceled. */
  router.delete('/api/v1/jobs/:id', async (req, res) => {
    const job = await deps.stores.jobs.getOwned(accountOf(req), req.params.id);
    if (!job) throw new NotFoundError(`The job "${req.params.id}"`);
    if (job.status === 'canceled') return void res.json(jobResource(job));
    if (FINAL_STATUSES.includes(job.status) || job.attempts > 0) {
      throw new ConflictError('job_started', `The job is ${job.status}; only jobs that have not started can be canceled.`);
    }
    if (mayHaveMadeKey(job)) {
      throw new ConflictError('job_started', 'An earlier run of this job made its AWS key; the job can only run to its end (retry-failed set it back to queued).');
    }
    // Out of the queue first, so that no worker takes it. remove() refuses a job a worker holds (its lock): one
    // held ahead of a free slot (WORKER_PREFETCH), or about to start. The record decides then: its status is
    // set only while still queued, and the worker's start write, from the record it read, is a compare-and-set
    // too, so exactly one of the two wins; a worker that loses does nothing with the job.
    await deps.queue.remove(job.queue_job_id);
    const update = await deps.stores.jobs.updateIf(job.id, 'queued', (j) => {
      j.status = 'canceled';
      j.finished_at = new Date().toISOString();
    });
    if (!update) throw new ConflictError('job_started', 'The job has started; only jobs that have not started can be canceled.');
    jobsFinished.inc({ status: 'canceled', code: '' });
    await deps.notifier.after(update);
    res.json(jobResource(update.job));
  });

  /** Server-Sent Events of the job's status and step changes, ending after its final state. */
  router.get('/api/v1/jobs/:id/events', async (req, res) => {
    const account = accountOf(req);
    const job = await deps.stores.jobs.getOwned(account, req.params.id);
    if (!job) throw new NotFoundError(`The job "${req.params.id}"`);
    const isFinal = (e: SseEvent) => FINAL_STATUSES.includes((JSON.parse(e.data) as { status: JobStatus }).status);
    await streamEvents(req, res, {
      redis: deps.redis,
      streamKey: deps.stores.keys.jobEvents(job.id),
      keepAliveMs: deps.keepAliveMs,
      snapshot: async (lastId) => {
        const now = (await deps.stores.jobs.get(job.id)) ?? job;
        return [{ id: lastId, event: 'job', data: JSON.stringify(jobResource(now)) }];
      },
      isFinal,
    });
  });

  return router;
}
