import { Router, type Response } from 'express';
import { FINAL_STATUSES, jobResource, type JobRecord } from '../../shared/jobs.js';
import type { Stores } from '../../shared/context.js';
import { accountOf } from '../auth.js';
import type { Intake } from '../intake.js';
import type { JobWaiter } from '../job-waiter.js';
import { problem, sendProblem } from '../problem.js';

export const RETRY_AFTER_SECONDS = 2;

/** `Prefer: wait=N` (RFC 7240), capped; undefined when absent or malformed. */
export function preferWait(header: string | undefined, max: number): number | undefined {
  const m = header ? /(?:^|[,;\s])wait=(\d+)/i.exec(header) : null;
  return m?.[1] === undefined ? undefined : Math.min(Number(m[1]), max);
}

/**
 * The 202 with the job's resource, written with Node's own `res.end`: Express's `res.json` path, with the SHA-1
 * ETag it computes for the body (which no cache can use on the answer to a POST), cost about 6 % of an accepted
 * upload's instructions (the ETag alone about 2 %).
 */
export function sendAccepted(res: Response, job: JobRecord): void {
  const body = JSON.stringify(jobResource(job));
  res.statusCode = 202;
  res.setHeader('Location', `/api/v1/jobs/${job.id}`);
  res.setHeader('Retry-After', String(RETRY_AFTER_SECONDS));
  res.setHeader('Content-Type', 'application/json; charset=utf-8');
  res.setHeader('Content-Length', Buffer.byteLength(body));
  res.end(body);
}

/** A finished job as the answer to a waited request: 201 + the key, or the failure as a problem. */
export function sendFinished(res: Response, job: JobRecord, wait: number): void {
  res.setHeader('Preference-Applied', `wait=${wait}`);
  if (job.status === 'succeeded' && job.result) {
    res.status(201).location(`/api/v1/cckm/aws/keys/${String(job.result.id)}`).json(job.result);
    return;
  }
  const err = job.error ?? { code: job.status, message: `The job ended ${job.status}.`, retryable: false };
  sendProblem(res, problem(err.retryable ? 502 : 422, err.code, err.message, { instance: `/api/v1/jobs/${job.id}`, job: jobResource(job) }));
}

export function uploadKeyRoutes(deps: { intake: Intake; stores: Stores; waiter: JobWaiter; maxWait: number }): Router {
  const router = Router();
  router.post('/api/v1/cckm/aws/upload-key', async (req, res) => {
    const account = accountOf(req);
    const { job } = await deps.intake.submitUpload(account, req.body, req.get('idempotency-key'));
    const wait = preferWait(req.get('prefer'), deps.maxWait);
    if (wait === undefined || wait === 0) return sendAccepted(res, job);

    // The job is accepted: if its record cannot be read now (Redis away), the answer is the 202 with what is known.
    let latest = job;
    const isDone = async () => {
      latest = (await deps.stores.jobs.get(job.id).catch(() => undefined)) ?? latest;
      return FINAL_STATUSES.includes(latest.status);
    };
    await deps.waiter.wait(job.id, wait * 1000, isDone);
    if (await isDone()) return sendFinished(res, latest, wait);
    sendAccepted(res, latest);
  });
  return router;
}
