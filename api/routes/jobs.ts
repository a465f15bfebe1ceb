import { Router } from 'express';
import type { Queue } from 'bullmq';
import type { Stores } from '../../shared/context.js';
import { ConflictError, NotFoundError } from '../../shared/errors.js';
import { FINAL_STATUSES, jobResource, type JobStatus } from '../../shared/jobs.js';
import type { Notifier } from '../../shared/notifier.js';
import type { RedisClient } from '../../shared/redis.js';
import { streamEvents, type SseEvent, type StreamLimit } from '../sse.js';
import { accountOf } from '../auth.js';
import { cancelQueuedJob } from '../cancel.js';

export function jobRoutes(deps: { stores: Stores; queue: Queue; redis: RedisClient; notifier: Notifier; keepAliveMs: number; streamLimit: StreamLimit }): Router {
  const router = Router();

  router.get('/api/v1/jobs/:id', async (req, res) => {
    const job = await deps.stores.jobs.getOwned(accountOf(req), req.params.id);
    if (!job) throw new NotFoundError(`The job "${req.params.id}"`);
    res.json(jobResource(job));
  });

  /** Cancels a job no worker has started: it is marked canceled, then removed from the queue (cancelQueuedJob). */
  router.delete('/api/v1/jobs/:id', async (req, res) => {
    const job = await deps.stores.jobs.getOwned(accountOf(req), req.params.id);
    if (!job) throw new NotFoundError(`The job "${req.params.id}"`);
    if (job.status === 'canceled') return void res.json(jobResource(job));
    if (FINAL_STATUSES.includes(job.status) || job.attempts > 0) {
      throw new ConflictError('job_started', `The job is ${job.status}; only jobs that have not started can be canceled.`);
    }
    const update = await cancelQueuedJob(deps, job);
    if (update === 'key_made') {
      throw new ConflictError('job_started', 'An earlier run of this job made its AWS key; the job can only run to its end (retry-failed set it back to queued).');
    }
    if (update === 'started') throw new ConflictError('job_started', 'The job has started; only jobs that have not started can be canceled.');
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
      account,
      limit: deps.streamLimit,
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
