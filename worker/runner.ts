import { DelayedError, UnrecoverableError, WaitingError, Worker, type Job } from 'bullmq';
import type { Config } from '../shared/config.js';
import { RESUMED_BATCH_PRIORITY } from '../shared/batches.js';
import { createStores } from '../shared/context.js';
import { PipelineError } from '../shared/errors.js';
import { FINAL_STATUSES, mayHaveMadeKey, UPLOAD_QUEUE, type JobRecord, type Step, type UploadJobData } from '../shared/jobs.js';
import { JobTakenOver, type HeldJob } from '../shared/stores/job-store.js';
import { Notifier } from '../shared/notifier.js';
import { createWebhookQueue, enqueueWebhook } from '../shared/webhooks.js';
import { createLogger, type Logger } from '../shared/logger.js';
import { jobDuration, jobsFinished, quotaWaits, startMetricsServer } from '../shared/metrics.js';
import { uploadBackoffDelay } from '../shared/queues.js';
import { bullTelemetry } from '../shared/tracing.js';
import { createRedis } from '../shared/redis.js';
import { classify, classifyAttempt } from './classify.js';
import { kmsEndpointPolicy } from '../shared/kms-endpoints.js';
import { KmsClients } from './kms-clients.js';
import { KmsQuota, KmsQuotaWait } from './kms-quota.js';
import { AttemptFailure, UploadPipeline, type RunState } from './pipeline.js';
import { Slots } from './slots.js';
import { Sources } from './sources/index.js';
import { startWebhookWorker } from './webhook-delivery.js';

/**
 * Logged by a run whose job's record changed under it (JobTakenOver): another worker took the job over, or the
 * record is gone. It stops at once, writing nothing more.
 */
export const TAKEN_OVER = 'another worker took this job over (this worker had lost its lock on it), or its record is gone: this run stops here and writes nothing more';

export interface WorkerHandle {
  worker: Worker<UploadJobData>;
  /** URL of this process's Prometheus `GET /metrics` listener (WORKER_METRICS_PORT). */
  metricsUrl: string;
  close(): Promise<void>;
}

/** Starts one worker process's share of the upload queue and of the webhook queue. */
export async function startWorker(config: Config, logger: Logger = createLogger(config.LOG_LEVEL, 'keyferry-worker')): Promise<WorkerHandle> {
  // First, so that a port already taken stops the start before anything else is opened.
  const metrics = await startMetricsServer(config.WORKER_METRICS_PORT, config.HOST);
  const redis = createRedis(config);
  redis.on('error', (err: Error) => logger.warn({ err: err.message }, 'redis connection error'));
  const stores = createStores(config, redis);
  const clients = new KmsClients(stores.box, config.KMS_TIMEOUT_MS, kmsEndpointPolicy(config));
  const sources = new Sources({ stores, config, logger });
  const pipeline = new UploadPipeline({
    stores,
    sources,
    clients,
    quota: new KmsQuota({ redis, keys: stores.keys, quotas: config.KMS_QUOTAS, maxSleepMs: config.KMS_QUOTA_MAX_SLEEP_MS }),
    logger,
    defaultWrappingKeySpec: config.DEFAULT_WRAPPING_KEY_SPEC,
  });
  const slots = new Slots(config.WORKER_CONCURRENCY);
  const webhookQueue = createWebhookQueue(redis, stores.keys);
  const notifier = new Notifier(stores, (event) => enqueueWebhook(webhookQueue, event));

  /**
   * Records a failed attempt. A final one first schedules deletion of a key that never got material, so the
   * failed record already says so, then notifies.
   */
  const recordFinished = (job: JobRecord) => {
    jobsFinished.inc({ status: job.status, code: job.error?.code ?? '' });
    const ms = Date.parse(job.finished_at ?? '') - Date.parse(job.created_at);
    if (Number.isFinite(ms)) jobDuration.observe(Math.max(0, ms) / 1000);
  };

  /**
   * Records a failed attempt, from `held`: the record as this writer last read or wrote it. The write happens
   * only if no one else wrote the record since (JobStore.updateFrom): for a run, only if no other worker took
   * its job over; for the handler of a job that stalled for good, only if a cancel did not win meanwhile. A
   * final failure first schedules deletion of a key that never got material (from the same check), so the
   * failed record already says so, then notifies. Throws JobTakenOver, having written nothing, if the record
   * changed.
   * `step`: where the attempt failed, when the record may show another step (the pipeline's AttemptFailure).
   */
  const recordFailure = async (held: HeldJob, err: PipelineError, final: boolean, log: Logger, step?: Step) => {
    const state = { held };
    if (final) {
      const deletion = await pipeline.cleanUp(state).catch((e: unknown) => {
        if (e instanceof JobTakenOver) throw e;
        log.error({ err: classify(e).message }, 'could not schedule deletion of the orphan key');
        return undefined;
      });
      if (deletion) log.info({ deletion }, 'scheduled deletion of the key that never received material');
    }
    const failed = await stores.jobs.updateFrom(state.held, (j) => {
      j.status = final ? 'failed' : 'retrying';
      if (step) j.step = step;
      j.error = { code: err.code, message: err.message, retryable: err.retryable };
      if (err.code === 'import_token_expired') delete j.progress.import_params;
      if (final) j.finished_at = new Date().toISOString();
    });
    log.warn({ code: err.code, retryable: err.retryable, final, step: failed.job.step }, 'upload attempt failed');
    if (final) {
      recordFinished(failed.job);
      await notifier.after(failed);
    }
  };

  /**
   * A KMS call's slot is further off than a worker should sleep: the job goes back to the queue until then,
   * without counting an attempt, and resumes from its checkpoints. A queued job that has made nothing in AWS
   * yet goes back to `queued` (so it can still be canceled), any other is `retrying`, at the step it will
   * resume. The record is written first, so the job cannot come back before it. A batch job comes back before
   * the batch jobs that have not started, so that its slot is not taken late.
   */
  const delayForQuota = async (job: Job<UploadJobData>, token: string | undefined, before: JobRecord, held: HeldJob, wait: KmsQuotaWait, log: Logger): Promise<never> => {
    await stores.jobs.updateFrom(held, (j) => {
      const madeNothing = !mayHaveMadeKey(j.progress);
      j.status = madeNothing && before.status === 'queued' ? 'queued' : 'retrying';
      if (madeNothing) j.attempts = before.attempts;
    });
    if (job.priority > 0) await job.changePriority({ priority: RESUMED_BATCH_PRIORITY });
    await job.moveToDelayed(Date.now() + wait.waitMs, token);
    quotaWaits.inc({ operation: wait.op });
    log.debug({ op: wait.op, wait_ms: wait.waitMs }, 'waiting for the KMS quota of the AWS account and region');
    throw new DelayedError();
  };

  /** A key that a run which lost its job made (see UploadPipeline.dropKeyOfLostRun); logged either way. */
  const dropKeyOfLostRun = async (jobId: string, keyId: string, log: Logger) => {
    const outcome = await pipeline.dropKeyOfLostRun(jobId, keyId).catch((e: unknown) => {
      log.error({ err: classify(e).message, kms_key_id: keyId }, 'could not schedule deletion of the key this run made before it lost the job');
      return undefined;
    });
    if (outcome === 'scheduled') log.warn({ kms_key_id: keyId }, 'scheduled deletion of the key this run made: the job goes on with another');
    if (outcome === 'unknown') log.warn({ kms_key_id: keyId }, 'left the key this run made: the job may still adopt it (found by its tag)');
  };

  const startAndRun = async (job: Job<UploadJobData>, token: string | undefined, loaded: HeldJob, log: Logger) => {
    // The first step's reads of Redis go out with the start write (one socket write); they are dropped if the
    // job does not start. Compare-and-set: a cancel that won the race leaves the job alone. The write goes from
    // the record read before the slot was free (checked unchanged inside the write script), and enters the
    // pipeline's first step (see UploadPipeline.start). The job's request, which the reads need, never changes.
    const lookups = pipeline.lookUp(loaded.job);
    const startFrom = (from: HeldJob) =>
      stores.jobs.updateFrom(from, (j) => UploadPipeline.start(j, job.attemptsMade + 1)).catch((e: unknown) => {
        if (e instanceof JobTakenOver) return undefined;
        throw e;
      });
    let from = loaded;
    let started = await startFrom(from);
    // Changed since it was read. Canceled, or finished by a run that had lost its lock and still wrote last: left
    // alone. Changed otherwise (such a run's checkpoint or failure, written before this start): started from it.
    for (let tries = 0; !started && tries < 3; tries++) {
      const fresh = await stores.jobs.getHeld(job.data.jobId);
      if (!fresh || FINAL_STATUSES.includes(fresh.job.status)) break;
      from = fresh;
      started = await startFrom(from);
    }
    if (!started) {
      log.info('the job changed before it started (canceled?); nothing to do');
      return;
    }
    const current = from.job;
    try {
      const done = await pipeline.run(started, lookups);
      log.info({ kms_key_arn: done.job.progress.kms_key_arn, attempts: done.job.attempts }, 'upload succeeded');
      recordFinished(done.job);
      await notifier.after(done);
    } catch (failure) {
      const { cause: thrown, step, run } = failure instanceof AttemptFailure ? failure : { cause: failure, step: undefined, run: { held: started } as RunState };
      const { held } = run;
      try {
        if (thrown instanceof JobTakenOver) throw thrown;
        if (thrown instanceof KmsQuotaWait) return await delayForQuota(job, token, current, held, thrown, log);
        const { progress } = held.job;
        const err = classifyAttempt(thrown, run.madeKeyId || progress.kms_key_id ? progress.create_key_started_at : undefined);
        const final = !err.retryable || job.attemptsMade + 1 >= (job.opts.attempts ?? 1);
        await recordFailure(held, err, final, log, step);
        throw err.retryable ? err : new UnrecoverableError(`${err.code}: ${err.message}`);
      } catch (e) {
        // Another worker runs the job now: BullMQ's lock on it is that worker's, so the move to failed that
        // BullMQ tries with this run's token fails too, and changes nothing.
        if (e instanceof JobTakenOver) {
          log.warn({ step: held.job.step }, TAKEN_OVER);
          if (run.madeKeyId) await dropKeyOfLostRun(job.data.jobId, run.madeKeyId, log);
        }
        throw e;
      }
    }
  };

  const processJob = async (job: Job<UploadJobData>, token?: string) => {
    const { jobId, account } = job.data;
    const loaded = await stores.jobs.getHeld(jobId);
    const current = loaded?.job;
    const log = logger.child({ job_id: jobId, account, ...(current?.batch_id ? { batch_id: current.batch_id } : {}) });
    if (!loaded || !current || FINAL_STATUSES.includes(current.status)) {
      // Already final: an earlier run may have died before notifying; notifying again delivers once.
      if (current) {
        await notifier.jobFinished(current);
        if (current.batch_id) await notifier.batchCompleted(current.account, current.batch_id);
      }
      log.info({ status: current?.status ?? 'missing' }, 'nothing to do');
      return;
    }
    // A job fetched ahead (WORKER_PREFETCH) waits here, its record in hand, for a slot. A worker that shuts down
    // puts the waiting ones back in the queue, unstarted, where they were in line. (The first step's reads go
    // out with the start write, in startAndRun: it waits for them only after that write, so sending them earlier
    // would gain nothing and cost a socket write of their own.)
    if (!(await slots.acquire())) {
      // Should the move fail (the lock was lost meanwhile), the job's lock expires and it is taken up as stalled.
      await job.moveToWait(token).then(
        () => log.info('worker shutting down: the job goes back to the queue unstarted'),
        (err: unknown) => log.warn({ err: classify(err).message }, 'worker shutting down: could not put the unstarted job back; it is taken up again once its lock expires'),
      );
      throw new WaitingError();
    }
    try {
      return await startAndRun(job, token, loaded, log);
    } finally {
      slots.release();
    }
  };

  const workerConnection = createRedis(config); // BullMQ does not close a client it is given
  workerConnection.on('error', (err: Error) => logger.warn({ err: err.message }, 'redis connection error'));
  const worker = new Worker<UploadJobData>(UPLOAD_QUEUE, processJob, {
    connection: workerConnection,
    prefix: stores.keys.bullPrefix,
    // The slots' jobs and those held ahead of them (see processJob).
    concurrency: config.WORKER_CONCURRENCY + config.WORKER_PREFETCH,
    // A job whose worker died (its lock expired) is run again from its checkpoints by another worker.
    lockDuration: config.WORKER_LOCK_DURATION_MS,
    stalledInterval: config.WORKER_STALLED_INTERVAL_MS,
    maxStalledCount: config.WORKER_MAX_STALLED_COUNT,
    settings: { backoffStrategy: (attemptsMade: number) => uploadBackoffDelay(attemptsMade, config) },
    ...bullTelemetry(),
  });
  worker.on('error', (err) => logger.warn({ err: err.message }, 'worker error'));
  // A job that stalled more than WORKER_MAX_STALLED_COUNT times is failed by BullMQ without running
  // processJob, so its record is finished here. processJob records its own failures.
  worker.on('failed', (job, reason) => {
    if (!job?.deferredFailure) return;
    const { jobId, account } = job.data;
    const log = logger.child({ job_id: jobId, account });
    const err = new PipelineError('worker_lost', `Workers died running this job more often than WORKER_MAX_STALLED_COUNT allows (${reason.message}).`, false);
    stores.jobs
      .getHeld(jobId)
      // From the record read: a job held ahead of a slot that stalled is still queued, and a cancel may win.
      .then((held) => (held && !FINAL_STATUSES.includes(held.job.status) ? recordFailure(held, err, true, log) : undefined))
      .catch((e: unknown) => {
        if (e instanceof JobTakenOver) log.info('the job changed before its failure was recorded (canceled?); nothing recorded');
        else log.error({ err: classify(e).message }, 'could not record the failure of a stalled job');
      });
  });
  const webhooks = await startWebhookWorker(config, logger);
  await worker.waitUntilReady();
  logger.info({ concurrency: config.WORKER_CONCURRENCY, prefetch: config.WORKER_PREFETCH, metrics_url: metrics.url }, 'worker started');

  return {
    worker,
    metricsUrl: metrics.url,
    async close() {
      // BullMQ stops fetching first; then the jobs waiting for a slot go back to the queue.
      const closing = worker.close();
      slots.close();
      await closing;
      await sources.close();
      await webhooks.close();
      await webhookQueue.close();
      clients.destroy();
      workerConnection.disconnect();
      redis.disconnect();
      await metrics.close();
    },
  };
}
