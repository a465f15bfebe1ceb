import { Router } from 'express';
import type { Queue } from 'bullmq';
import type { Stores } from '../../shared/context.js';
import { ConflictError, NotFoundError } from '../../shared/errors.js';
import { FINAL_STATUSES, jobResource } from '../../shared/jobs.js';
import { accountOf } from '../auth.js';

export function jobRoutes(deps: { stores: Stores; queue: Queue }): Router {
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
    // remove() refuses a job a worker holds the lock of, so a job cannot be canceled and run at once.
    const removed = await deps.queue.remove(job.id);
    if (removed !== 1) throw new ConflictError('job_started', 'The job has started; only jobs that have not started can be canceled.');
    const canceled = await deps.stores.jobs.update(job.id, (j) => {
      j.status = 'canceled';
      j.finished_at = new Date().toISOString();
    });
    res.json(jobResource(canceled));
  });

  return router;
}
