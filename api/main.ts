import { loadConfigOrExit } from '../shared/config.js';
import { createLogger, exitAfter } from '../shared/logger.js';
import { startTracing } from '../shared/tracing.js';
import { startApi } from './server.js';

const config = loadConfigOrExit();
const logger = createLogger(config.LOG_LEVEL, 'keyferry-api');
// Before the queues are made: they take their telemetry when constructed.
const tracing = await startTracing(config, 'keyferry-api');
if (tracing) logger.info({ service_name: tracing.serviceName }, 'tracing on');
const api = await startApi(config, logger);

for (const signal of ['SIGTERM', 'SIGINT'] as const) {
  process.once(signal, () => {
    logger.info({ signal }, 'shutting down');
    // The last spans (the queue's close among them) are exported before the process exits.
    exitAfter(
      api.close().then(() => tracing?.shutdown()),
      logger,
    );
  });
}
