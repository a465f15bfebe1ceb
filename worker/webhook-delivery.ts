import http, { type IncomingHttpHeaders } from 'node:http';
import https from 'node:https';
import type { BlockList, LookupFunction } from 'node:net';
import { UnrecoverableError, Worker, type Job } from 'bullmq';
import { Webhook } from 'standardwebhooks';
import type { Config } from '../shared/config.js';
import { createStores } from '../shared/context.js';
import { createLogger, type Logger } from '../shared/logger.js';
import { webhookDeliveries } from '../shared/metrics.js';
import { createRedis } from '../shared/redis.js';
import { dnsResolver, ForbiddenAddressError, parseCidrs, resolveAllowed, type HostResolver, type ResolvedAddresses } from '../shared/ssrf.js';
import { bullTelemetry } from '../shared/tracing.js';
import { WebhookSecretStore } from '../shared/stores/webhook-secret-store.js';
import { GoneUrls, WEBHOOK_QUEUE, WebhookDeliveries, type DeliveryOutcome, type DeliveryRecord, type WebhookJobData } from '../shared/webhooks.js';

/** A Retry-After longer than this is cut to it. */
const MAX_RETRY_AFTER_MS = 86_400_000;
export interface DeliveryDeps {
  secrets: WebhookSecretStore;
  deliveries: WebhookDeliveries;
  gone: GoneUrls;
  allowCidrs: BlockList;
  /** Callback hosts' names, resolved over DNS without holding a libuv thread (dnsResolver). */
  resolveHost: HostResolver;
  timeoutMs: number;
  /** Delay before each retry, ms (WEBHOOK_RETRY_SCHEDULE); when used up, a failed attempt is the last. */
  retryDelaysMs: number[];
  logger: Logger;
}

interface AttemptResult {
  outcome: DeliveryOutcome;
  status_code: number | null;
  error: string | null;
  /** From Retry-After on a 429 or 503. */
  retryAfterMs?: number | undefined;
}

/** Thrown after a failed attempt so that BullMQ runs the next one `delayMs` later (see the worker's backoffStrategy). */
class RetryLater extends Error {
  constructor(
    readonly delayMs: number,
    message: string,
  ) {
    super(message);
    this.name = 'RetryLater';
  }
}

/** Retry-After as seconds or an HTTP date, in ms from now; undefined when absent or unreadable. */
export function retryAfterMs(value: string | undefined, now = Date.now()): number | undefined {
  if (value === undefined) return undefined;
  const ms = /^\s*\d+\s*$/.test(value) ? Number(value) * 1000 : Date.parse(value) - now;
  return Number.isNaN(ms) ? undefined : Math.min(Math.max(ms, 0), MAX_RETRY_AFTER_MS);
}

/** The delay after failed attempt `attempt` (1-based): Retry-After when given, else the schedule ±20 %; undefined when it was the last. */
function nextDelay(attempt: number, retryAfter: number | undefined, retryDelaysMs: readonly number[]): number | undefined {
  const scheduled = retryDelaysMs[attempt - 1];
  if (scheduled === undefined) return undefined;
  return retryAfter ?? Math.round(scheduled * (0.8 + Math.random() * 0.4));
}

function classifyAnswer(status: number, headers: IncomingHttpHeaders): AttemptResult {
  if (status >= 200 && status < 300) return { outcome: 'delivered', status_code: status, error: null };
  if (status === 410) return { outcome: 'gone', status_code: status, error: 'http_410' };
  // Anything else fails, 3xx included: redirects are not followed (they could lead anywhere).
  const retryAfter = status === 429 || status === 503 ? retryAfterMs(headers['retry-after']) : undefined;
  return { outcome: 'failed', status_code: status, error: `http_${status}`, retryAfterMs: retryAfter };
}

function errorCode(err: unknown): string {
  const e = err as NodeJS.ErrnoException;
  return e.code ?? e.message;
}

/**
 * POSTs to the addresses resolved and checked before: the custom lookup hands them to the socket, so no
 * second DNS answer can redirect the connection. The URL's host still names the Host header and TLS SNI.
 * The timeout covers the whole exchange; the answer's body is read and dropped.
 */
function post(url: URL, addresses: ResolvedAddresses, headers: Record<string, string>, body: string, timeoutMs: number) {
  const lookup: LookupFunction = (_host, options, callback) => {
    if (options.all) callback(null, addresses);
    else callback(null, addresses[0].address, addresses[0].family);
  };
  const request = url.protocol === 'https:' ? https.request : http.request;
  let timer: NodeJS.Timeout | undefined;
  return new Promise<{ status: number; headers: IncomingHttpHeaders }>((resolve, reject) => {
    const req = request(url, {
      method: 'POST',
      headers: { ...headers, 'content-length': String(Buffer.byteLength(body)) },
      lookup,
      agent: false,
    });
    timer = setTimeout(() => req.destroy(Object.assign(new Error('timed out'), { code: 'timeout' })), timeoutMs);
    req.on('error', reject);
    req.on('response', (res) => {
      res.on('error', reject);
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers }));
      res.resume();
    });
    req.end(body);
  }).finally(() => clearTimeout(timer));
}

/** One attempt: secrets, address check, signed POST. Never throws for the receiver's or the network's failures. */
async function attemptDelivery(msg: WebhookJobData, deps: DeliveryDeps): Promise<AttemptResult> {
  const secrets = await deps.secrets.signingSecrets(msg.account);
  if (secrets.length === 0) return { outcome: 'failed', status_code: null, error: 'no_webhook_secret' };
  const url = new URL(msg.url);
  let addresses: ResolvedAddresses;
  try {
    addresses = await resolveAllowed(url.hostname, deps.allowCidrs, deps.resolveHost);
  } catch (err) {
    if (err instanceof ForbiddenAddressError) return { outcome: 'forbidden', status_code: null, error: 'forbidden_address' };
    return { outcome: 'failed', status_code: null, error: `dns_failed: ${errorCode(err)}` };
  }
  // Standard Webhooks: the timestamp is the attempt's; with a previous secret in grace, both signatures are sent.
  const now = new Date();
  const headers = {
    'content-type': 'application/json',
    'user-agent': 'keyferry-webhooks',
    'webhook-id': msg.msgId,
    'webhook-timestamp': String(Math.floor(now.getTime() / 1000)),
    'webhook-signature': secrets.map((s) => new Webhook(s).sign(msg.msgId, now, msg.body)).join(' '),
  };
  try {
    const answer = await post(url, addresses, headers, msg.body, deps.timeoutMs);
    return classifyAnswer(answer.status, answer.headers);
  } catch (err) {
    return { outcome: 'failed', status_code: null, error: errorCode(err) === 'timeout' ? 'timeout' : `connection_failed: ${errorCode(err)}` };
  }
}

/**
 * Processes one webhook job: skips a URL known to be gone, else makes one attempt; records it in the
 * deliveries list; then asks BullMQ for a retry (RetryLater), ends the job as failed for good
 * (UnrecoverableError: gone, forbidden, schedule used up) or returns (delivered, skipped).
 */
export async function deliverWebhook(job: Job<WebhookJobData>, deps: DeliveryDeps): Promise<void> {
  const msg = job.data;
  const attempt = job.attemptsMade + 1;
  const started = Date.now();
  const result: AttemptResult = (await deps.gone.has(msg.account, msg.url))
    ? { outcome: 'skipped', status_code: null, error: 'url_gone' }
    : await attemptDelivery(msg, deps);
  const retryDelay = result.outcome === 'failed' ? nextDelay(attempt, result.retryAfterMs, deps.retryDelaysMs) : undefined;
  const record: DeliveryRecord = {
    id: msg.msgId,
    event_type: msg.type,
    url: msg.url,
    attempt,
    at: new Date(started).toISOString(),
    status_code: result.status_code,
    latency_ms: Date.now() - started,
    outcome: result.outcome,
    error: result.error,
    next_attempt_at: retryDelay === undefined ? null : new Date(Date.now() + retryDelay).toISOString(),
  };
  webhookDeliveries.inc({ outcome: result.outcome });
  if (result.outcome === 'gone') await deps.gone.add(msg.account, msg.url);
  await deps.deliveries.append(msg.ownerId, record);

  const fields = {
    webhook_id: msg.msgId,
    event_type: msg.type,
    account: msg.account,
    owner_id: msg.ownerId,
    host: new URL(msg.url).host, // not the URL: its query may carry the receiver's token
    attempt,
    outcome: result.outcome,
    status_code: result.status_code,
    latency_ms: record.latency_ms,
    error: result.error,
  };
  if (result.outcome === 'delivered' || result.outcome === 'skipped') {
    deps.logger.info(fields, `webhook ${result.outcome}`);
    return;
  }
  deps.logger.warn({ ...fields, next_attempt_at: record.next_attempt_at }, 'webhook attempt failed');
  if (retryDelay !== undefined) throw new RetryLater(retryDelay, result.error ?? result.outcome);
  throw new UnrecoverableError(`webhook ${result.outcome} after ${attempt} attempt(s): ${result.error ?? ''}`);
}

export interface WebhookWorkerHandle {
  worker: Worker<WebhookJobData>;
  close(): Promise<void>;
}

/** Starts one process's share of the webhook queue. */
export async function startWebhookWorker(
  config: Config,
  logger: Logger = createLogger(config.LOG_LEVEL, 'keyferry-webhooks'),
): Promise<WebhookWorkerHandle> {
  const redis = createRedis(config);
  redis.on('error', (err: Error) => logger.warn({ err: err.message }, 'redis connection error'));
  const stores = createStores(config, redis);
  const deps: DeliveryDeps = {
    secrets: new WebhookSecretStore(redis, stores.keys, stores.box),
    deliveries: new WebhookDeliveries(redis, stores.keys),
    gone: new GoneUrls(redis, stores.keys),
    allowCidrs: parseCidrs(config.WEBHOOK_ALLOW_CIDRS),
    resolveHost: dnsResolver({ timeoutMs: 2000, tries: 2 }),
    timeoutMs: config.WEBHOOK_TIMEOUT_MS,
    retryDelaysMs: config.WEBHOOK_RETRY_SCHEDULE.split(',').map((s) => Number(s) * 1000),
    logger,
  };

  const worker = new Worker<WebhookJobData>(WEBHOOK_QUEUE, (job) => deliverWebhook(job, deps), {
    connection: redis, // BullMQ leaves a client it is given open (close() disconnects it) and duplicates it for blocking reads
    prefix: stores.keys.bullPrefix,
    concurrency: config.WEBHOOK_CONCURRENCY,
    settings: {
      // An unexpected error (Redis away, a secret that does not open) follows the schedule too; -1 = no retry.
      backoffStrategy: (attemptsMade, _type, err) =>
        err instanceof RetryLater ? err.delayMs : (nextDelay(attemptsMade, undefined, deps.retryDelaysMs) ?? -1),
    },
    ...bullTelemetry(),
  });
  worker.on('error', (err) => logger.warn({ err: err.message }, 'webhook worker error'));
  worker.on('failed', (job, err) => {
    if (!(err instanceof RetryLater || err instanceof UnrecoverableError)) logger.error({ webhook_id: job?.id, err: err.message }, 'webhook job error');
  });
  await worker.waitUntilReady();
  logger.info({ concurrency: config.WEBHOOK_CONCURRENCY }, 'webhook worker started');

  return {
    worker,
    async close() {
      await worker.close();
      redis.disconnect();
    },
  };
}
