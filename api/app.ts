import express, { type Express, type Request, type RequestHandler } from 'express';
import type { Config } from '../shared/config.js';
import type { Stores } from '../shared/context.js';
import type { Logger } from '../shared/logger.js';
import type { UploadQueue } from '../shared/queues.js';
import type { RedisClient } from '../shared/redis.js';
import { authOptions } from '../shared/auth.js';
import { kmsEndpointPolicy } from '../shared/kms-endpoints.js';
import { metricsText } from '../shared/metrics.js';
import { adminRoutes } from './admin.js';
import { requireAuth } from './auth.js';
import { openApiRoutes } from './openapi.js';
import type { Intake } from './intake.js';
import type { JobWaiter } from './job-waiter.js';
import { problem, problemHandler, sendProblem } from './problem.js';
import { accountRateLimit } from './rate-limit.js';
import { StreamLimit } from './sse.js';
import { requestLogging } from './request-id.js';
import type { Notifier } from '../shared/notifier.js';
import type { WebhookSecretStore } from '../shared/stores/webhook-secret-store.js';
import { createWebhookQueue, type GoneUrls, type WebhookDeliveries } from '../shared/webhooks.js';
import { batchRoutes } from './routes/batches.js';
import { jobRoutes } from './routes/jobs.js';
import { webhookRoutes } from './routes/webhooks.js';
import { traceRequests } from './request-tracing.js';
import { keyRoutes } from './routes/keys.js';
import { resourceRoutes } from './routes/resources.js';
import { sourceConnectionRoutes } from './routes/source-connections.js';
import { uploadKeyRoutes } from './routes/upload-key.js';

export interface AppDeps {
  config: Config;
  logger: Logger;
  redis: RedisClient;
  stores: Stores;
  queue: UploadQueue;
  intake: Intake;
  waiter: JobWaiter;
  notifier: Notifier;
  webhookSecrets: WebhookSecretStore;
  deliveries: WebhookDeliveries;
  goneUrls: GoneUrls;
}

/**
 * A request carries a body only with a Transfer-Encoding or a Content-Length above 0: a POST with neither
 * (`curl -X POST` without `-d`) has none, like one with `Content-Length: 0`.
 */
const hasBody = (req: Request) => req.headers['transfer-encoding'] !== undefined || (req.headers['content-length'] ?? '0') !== '0';

/** POST bodies must be JSON. */
const requireJson: RequestHandler = (req, res, next) => {
  if (req.method === 'POST' && hasBody(req) && req.body === undefined && !req.is('application/json')) {
    return sendProblem(res, problem(415, 'unsupported_media_type', 'Send the body as application/json.', { instance: req.originalUrl }));
  }
  next();
};

export function createApp(deps: AppDeps): Express {
  const app = express();
  app.disable('x-powered-by');
  app.set('trust proxy', false);
  // First: every response (probes and 404s included) carries X-Request-Id, and every request gets an access line.
  app.use(requestLogging(deps.logger));
  // A span per request, only while tracing is on (OTEL_EXPORTER_OTLP_ENDPOINT).
  const tracing = traceRequests();
  if (tracing) app.use(tracing);

  app.get('/healthz', (_req, res) => void res.json({ status: 'ok' }));
  // The OpenAPI document and its Swagger UI page, unauthenticated like /healthz.
  app.use(openApiRoutes());
  // Prometheus scrape target, unauthenticated like /healthz (expose it on an internal network only).
  app.get('/metrics', async (_req, res) => {
    const { contentType, body } = await metricsText();
    res.type(contentType).send(body);
  });
  app.get('/readyz', async (_req, res) => {
    const ok = await Promise.race([
      deps.redis.ping().then(() => true, () => false),
      new Promise<boolean>((r) => setTimeout(() => r(false), 1000).unref()),
    ]);
    if (ok) return void res.json({ status: 'ready', redis: 'ok' });
    sendProblem(res, problem(503, 'not_ready', 'Redis does not answer.', { redis: 'unreachable' }));
  });

  const auth = authOptions(deps.config);
  // Operators' queue dashboard: admin group only; its cookie is accepted under /admin and nowhere else.
  app.use(
    adminRoutes({ config: deps.config, auth, uploadQueue: deps.queue, webhookQueue: () => createWebhookQueue(deps.redis, deps.stores.keys) }),
  );

  // The caller is known, and within its rate, before any body is read.
  app.use('/api', requireAuth(auth));
  app.post(
    ['/api/v1/cckm/aws/upload-key', '/api/v1/cckm/aws/upload-key/batch'],
    accountRateLimit({ redis: deps.redis, keys: deps.stores.keys, ratePerSecond: deps.config.INTAKE_RATE_PER_SECOND, burst: deps.config.INTAKE_BURST }),
  );
  const jsonTypes = ['application/json', 'application/*+json'];
  // A batch of 10,000 items needs room; every other body is capped at 1 MiB.
  app.use('/api/v1/cckm/aws/upload-key/batch', express.json({ limit: '16mb', type: jsonTypes }));
  app.use('/api', express.json({ limit: '1mb', type: jsonTypes }));
  app.use('/api', requireJson);
  app.use(uploadKeyRoutes({ intake: deps.intake, stores: deps.stores, waiter: deps.waiter, maxWait: deps.config.MAX_PREFER_WAIT_SECONDS }));
  const keepAliveMs = deps.config.SSE_KEEPALIVE_MS;
  const streamLimit = new StreamLimit(deps.config.SSE_MAX_STREAMS_PER_ACCOUNT);
  app.use(jobRoutes({ stores: deps.stores, queue: deps.queue, redis: deps.redis, notifier: deps.notifier, keepAliveMs, streamLimit }));
  app.use(
    batchRoutes({ config: deps.config, intake: deps.intake, stores: deps.stores, queue: deps.queue, redis: deps.redis, notifier: deps.notifier, keepAliveMs, streamLimit }),
  );
  app.use(
    webhookRoutes({
      stores: deps.stores,
      secrets: deps.webhookSecrets,
      deliveries: deps.deliveries,
      gone: deps.goneUrls,
      graceSeconds: deps.config.WEBHOOK_SECRET_GRACE_SECONDS,
      ownsBatch: async (account, id) => (await deps.stores.batches.getOwned(account, id)) !== undefined,
    }),
  );
  app.use(keyRoutes({ stores: deps.stores }));
  app.use(resourceRoutes({ stores: deps.stores, endpoints: kmsEndpointPolicy(deps.config) }));
  app.use(
    sourceConnectionRoutes({
      stores: deps.stores,
      hsmLibraries: deps.config.HSM_LIBRARIES,
      hsmTokens: deps.config.HSM_TOKENS,
      dsmAllowedPorts: deps.config.DSM_ALLOWED_PORTS,
    }),
  );

  app.use((req, res) => sendProblem(res, problem(404, 'not_found', `No route for ${req.method} ${req.path}.`, { instance: req.originalUrl })));
  app.use(problemHandler(deps.logger));
  return app;
}
