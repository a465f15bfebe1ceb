import type { IncomingMessage, Server, ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Config } from '../shared/config.js';
import { createStores } from '../shared/context.js';
import { countQueue } from '../shared/metrics.js';
import { createLogger, type Logger } from '../shared/logger.js';
import { createUploadQueue } from '../shared/queues.js';
import { Notifier } from '../shared/notifier.js';
import { createRedis } from '../shared/redis.js';
import { WebhookSecretStore } from '../shared/stores/webhook-secret-store.js';
import { createWebhookQueue, enqueueWebhook, GoneUrls, WebhookDeliveries } from '../shared/webhooks.js';
import { createApp } from './app.js';
import { Intake } from './intake.js';
import { JobWaiter, uploadQueueWaiting } from './job-waiter.js';
import { answerClientError } from './problem.js';

export interface ApiServer {
  url: string;
  server: Server;
  close(): Promise<void>;
}

/** Starts the API on `config.PORT` (0 = ephemeral) and returns its URL and a close function. */
export async function startApi(config: Config, logger: Logger = createLogger(config.LOG_LEVEL, 'keyferry-api')): Promise<ApiServer> {
  const warn = (what: string) => (err: Error) => logger.warn({ err: err.message }, what);
  const redis = createRedis(config, { failFast: true });
  redis.on('error', warn('redis connection error'));
  const stores = createStores(config, redis);
  const queue = createUploadQueue(redis, stores.keys);
  queue.on('error', warn('upload queue error'));
  const waiter = new JobWaiter(uploadQueueWaiting({ config, redis, queue, keys: stores.keys, onError: warn('queue events error') }));
  const intake = new Intake(config, redis, stores, queue);
  const webhookQueue = createWebhookQueue(redis, stores.keys);
  webhookQueue.on('error', warn('webhook queue error'));
  const notifier = new Notifier(stores, (event) => enqueueWebhook(webhookQueue, event));
  const uncountQueues = [countQueue(queue), countQueue(webhookQueue)];
  const app = createApp({
    config,
    logger,
    redis,
    stores,
    queue,
    intake,
    waiter,
    notifier,
    webhookSecrets: new WebhookSecretStore(redis, stores.keys, stores.box),
    deliveries: new WebhookDeliveries(redis, stores.keys),
    goneUrls: new GoneUrls(redis, stores.keys),
  });

  const server = await new Promise<Server>((resolve, reject) => {
    const s = app.listen(config.PORT, config.HOST, (err?: Error) => (err ? reject(err) : resolve(s)));
  });
  // Event streams stay open until their job ends; on shutdown they are ended so close() does not wait on them.
  const streams = new Set<ServerResponse>();
  server.on('request', (req: IncomingMessage, res: ServerResponse) => {
    if (!req.url?.split('?')[0]?.endsWith('/events')) return;
    streams.add(res);
    res.on('close', () => streams.delete(res));
  });
  server.on('clientError', answerClientError);
  const addr = server.address() as AddressInfo;
  const host = addr.family === 'IPv6' ? `[${addr.address}]` : addr.address;
  const url = `http://${host === '0.0.0.0' || host === '[::]' ? '127.0.0.1' : host}:${addr.port}`;
  logger.info({ url }, 'api listening');
  const recovery = recoverStrandedBatches(intake, config.BATCH_RECOVERY_AFTER_MS, logger);

  return {
    url,
    server,
    async close() {
      for (const uncount of uncountQueues) uncount();
      await recovery.stop();
      // Stop accepting, let in-flight requests finish (idle keep-alive sockets close now), end event streams.
      await new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeIdleConnections();
        for (const res of streams) res.end();
      });
      await waiter.close();
      await queue.close();
      await webhookQueue.close();
      redis.disconnect();
    },
  };
}

/**
 * Looks for batches left recorded and not enqueued (Intake.recoverStrandedBatches) every quarter of `ageMs`
 * (at most every minute); a tick that comes while a look is under way is skipped. `stop` ends the looks and
 * waits for the batch under way.
 */
function recoverStrandedBatches(intake: Intake, ageMs: number, logger: Logger): { stop(): Promise<void> } {
  const stopped = new AbortController();
  let look: Promise<void> | undefined;
  const onError = (batch_id: string, err: Error) => logger.warn({ batch_id, err: err.message }, 'taking back a batch never enqueued failed; it is looked at again later');
  const timer = setInterval(
    () => {
      look ??= intake
        .recoverStrandedBatches(ageMs, { onError, signal: stopped.signal })
        .then(({ undone, enqueued, left, failed }) => {
          if (undone + enqueued > 0) logger.warn({ undone, enqueued, left, failed }, 'batches recorded but never enqueued were taken back or enqueued');
        })
        .catch((err: Error) => logger.warn({ err: err.message }, 'looking for batches never enqueued failed'))
        .finally(() => (look = undefined));
    },
    Math.min(60_000, Math.floor(ageMs / 4)),
  ).unref();
  return {
    async stop() {
      stopped.abort();
      clearInterval(timer);
      await look;
    },
  };
}
