import { UnrecoverableError, Worker, type Job } from 'bullmq';
import type { Config } from '../shared/config.js';
import { createStores } from '../shared/context.js';
import { UPLOAD_QUEUE, type UploadJobData } from '../shared/jobs.js';
import { createLogger, type Logger } from '../shared/logger.js';
import { createRedis } from '../shared/redis.js';
import { classify } from './classify.js';
import { KmsClients } from './kms-clients.js';
import { UploadPipeline } from './pipeline.js';

export interface WorkerHandle {
  worker: Worker<UploadJobData>;
  close(): Promise<void>;
}

/** Starts one worker process's share of the upload queue. */
export async function startWorker(config: Config, logger: Logger = createLogger(config.LOG_LEVEL, 'keyferry-worker')): Promise<WorkerHandle> {
  const redis = createRedis(config);
  redis.on('error', (err: Error) => logger.warn({ err: err.message }, 'redis connection error'));
  const stores = createStores(config, redis);
  const clients = new KmsClients(stores.box, config.KMS_TIMEOUT_MS);
  const pipeline = new UploadPipeline({
    stores,
    clients,
    logger,
    defaultWrappingKeySpec: config.DEFAULT_WRAPPING_KEY_SPEC,
    kmsTimeoutMs: config.KMS_TIMEOUT_MS,
  });

  const processJob = async (job: Job<UploadJobData>) => {
    const { jobId, account } = job.data;
    const log = logger.child({ job_id: jobId, account });
    const current = await stores.jobs.get(jobId);
    if (!current || current.status === 'succeeded' || current.status === 'canceled') {
      log.info({ status: current?.status ?? 'missing' }, 'nothing to do');
      return;
    }
    await stores.jobs.update(jobId, (j) => {
      j.status = 'running';
      j.attempts = job.attemptsMade + 1;
    });
    try {
      const done = await pipeline.run(jobId);
      log.info({ kms_key_arn: done.progress.kms_key_arn, attempts: done.attempts }, 'upload succeeded');
    } catch (thrown) {
      const err = classify(thrown);
      const final = !err.retryable || job.attemptsMade + 1 >= (job.opts.attempts ?? 1);
      await stores.jobs.update(jobId, (j) => {
        j.status = final ? 'failed' : 'retrying';
        j.error = { code: err.code, message: err.message, retryable: err.retryable };
        if (err.code === 'import_token_expired') delete j.progress.import_params;
        if (final) j.finished_at = new Date().toISOString();
      });
      log.warn({ code: err.code, retryable: err.retryable, final, step: current.step }, 'upload attempt failed');
      if (final) {
        const deletion = await pipeline.cleanUp(jobId).catch((e: unknown) => {
          log.error({ err: classify(e).message }, 'could not schedule deletion of the orphan key');
          return undefined;
        });
        if (deletion) log.info({ deletion }, 'scheduled deletion of the key that never received material');
      }
      throw err.retryable ? err : new UnrecoverableError(`${err.code}: ${err.message}`);
    }
  };

  const worker = new Worker<UploadJobData>(UPLOAD_QUEUE, processJob, {
    connection: createRedis(config),
    prefix: stores.keys.bullPrefix,
    concurrency: config.WORKER_CONCURRENCY,
  });
  worker.on('error', (err) => logger.warn({ err: err.message }, 'worker error'));
  await worker.waitUntilReady();
  logger.info({ concurrency: config.WORKER_CONCURRENCY }, 'worker started');

  return {
    worker,
    async close() {
      await worker.close();
      clients.destroy();
      redis.disconnect();
    },
  };
}
