import { loadConfigOrExit } from '../shared/config.js';
import { createLogger, exitAfter } from '../shared/logger.js';
import { startTracing } from '../shared/tracing.js';
import { startWorker } from './runner.js';

const config = loadConfigOrExit();
const logger = createLogger(config.LOG_LEVEL, 'keyferry-worker');
// Before the workers are made: they take their telemetry when constructed.
const tracing = await startTracing(config, 'keyferry-worker');
if (tracing) logger.info({ service_name: tracing.serviceName }, 'tracing on');
const handle = await startWorker(config, logger);

for (const signal of ['SIGTERM', 'SIGINT'] as const) {
  process.once(signal, () => {
    logger.info({ signal, grace_ms: config.WORKER_SHUTDOWN_GRACE_MS }, 'shutting down: finishing active jobs');
    // Past the grace period the process exits with jobs still active: their locks expire and another worker
    // resumes them from their checkpoints (the same path as a crash, which never duplicates a key).
    setTimeout(() => {
      logger.warn('grace period over: exiting with jobs still active; they resume elsewhere');
      // Spans of the finished jobs still go out, within a second.
      void Promise.resolve(tracing?.shutdown(1000)).finally(() => process.exit(0));
    }, config.WORKER_SHUTDOWN_GRACE_MS).unref();
    exitAfter(
      handle.close().then(() => tracing?.shutdown()),
      logger,
    );
  });
}
