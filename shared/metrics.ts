import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client';

/**
 * Prometheus metrics: one registry per process, scraped at `GET /metrics` (the API's route, a worker's own
 * listener on WORKER_METRICS_PORT). Labels stay bounded: no job ids, accounts or URLs.
 */
export const registry = new Registry();
collectDefaultMetrics({ register: registry, prefix: 'keyferry_' });

/** Job durations: from a few seconds to an hour (retries with backoff, quota waits). */
const JOB_BUCKETS = [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600];
/** Steps and KMS calls: milliseconds to a KMS timeout. */
const CALL_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30];

export const jobsAccepted = new Counter({
  name: 'keyferry_jobs_accepted_total',
  help: 'Upload jobs accepted by the API (a batch counts its items).',
  labelNames: ['kind'] as const,
  registers: [registry],
});

export const batchesRecovered = new Counter({
  name: 'keyferry_batches_recovered_total',
  help: 'Batches found recorded and never enqueued: taken back (undone), enqueued after all (a worker held or ran one of their jobs), or failed (looked at again later).',
  labelNames: ['outcome'] as const,
  registers: [registry],
});
// Each outcome's series exists from the start (at 0), so that increase() sees a process's first one.
for (const outcome of ['undone', 'enqueued', 'failed']) batchesRecovered.inc({ outcome }, 0);

export const jobsFinished = new Counter({
  name: 'keyferry_jobs_finished_total',
  help: 'Upload jobs that reached a final status (succeeded and failed in workers, canceled in the API); code is the error code or "".',
  labelNames: ['status', 'code'] as const,
  registers: [registry],
});

export const jobDuration = new Histogram({
  name: 'keyferry_job_duration_seconds',
  help: 'Time from a job being accepted to its final status (succeeded or failed), seconds.',
  buckets: JOB_BUCKETS,
  registers: [registry],
});

export const stepDuration = new Histogram({
  name: 'keyferry_step_duration_seconds',
  help: 'Time spent in one pipeline step during one attempt, seconds.',
  labelNames: ['step'] as const,
  buckets: CALL_BUCKETS,
  registers: [registry],
});

export const kmsRequests = new Counter({
  name: 'keyferry_kms_requests_total',
  help: 'AWS KMS requests sent, by operation and outcome; code is the AWS error name or "".',
  labelNames: ['operation', 'outcome', 'code'] as const,
  registers: [registry],
});

export const kmsRequestDuration = new Histogram({
  name: 'keyferry_kms_request_duration_seconds',
  help: 'Latency of AWS KMS requests (after any quota wait), seconds.',
  labelNames: ['operation'] as const,
  buckets: CALL_BUCKETS,
  registers: [registry],
});

export const quotaWaits = new Counter({
  name: 'keyferry_quota_waits_total',
  help: 'Jobs put back in the queue (delayed) to wait for a KMS request quota.',
  labelNames: ['operation'] as const,
  registers: [registry],
});

export const webhookDeliveries = new Counter({
  name: 'keyferry_webhook_deliveries_total',
  help: 'Webhook delivery attempts, by outcome (delivered, failed, gone, forbidden, skipped).',
  labelNames: ['outcome'] as const,
  registers: [registry],
});

/** A queue whose job counts the queue gauge reports (BullMQ's Queue fits). */
export interface CountedQueue {
  readonly name: string;
  getJobCounts(): Promise<Record<string, number>>;
}

const countedQueues = new Set<CountedQueue>();
/** How long a scrape waits for a queue's counts (Redis away) before leaving them out. */
const QUEUE_COUNT_TIMEOUT_MS = 1000;

new Gauge({
  name: 'keyferry_queue_jobs',
  help: 'BullMQ jobs per queue and state, read at scrape time.',
  labelNames: ['queue', 'state'] as const,
  registers: [registry],
  async collect() {
    this.reset();
    await Promise.all(
      [...countedQueues].map(async (queue) => {
        const counts = await Promise.race([
          queue.getJobCounts().catch(() => undefined),
          new Promise<undefined>((r) => setTimeout(() => r(undefined), QUEUE_COUNT_TIMEOUT_MS).unref()),
        ]);
        for (const [state, n] of Object.entries(counts ?? {})) this.inc({ queue: queue.name, state }, n);
      }),
    );
  },
});

/** Reports `queue`'s job counts on every scrape until the returned function is called. */
export function countQueue(queue: CountedQueue): () => void {
  countedQueues.add(queue);
  return () => void countedQueues.delete(queue);
}

/** The text exposition of every metric of this process. */
export async function metricsText(): Promise<{ contentType: string; body: string }> {
  return { contentType: registry.contentType, body: await registry.metrics() };
}

export interface MetricsServer {
  url: string;
  close(): Promise<void>;
}

/** A small listener answering `GET /metrics` (for worker processes, which have no HTTP API). */
export async function startMetricsServer(port: number, host: string): Promise<MetricsServer> {
  const server: Server = createServer((req, res) => {
    if (req.method !== 'GET' || req.url?.split('?')[0] !== '/metrics') {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('not found\n');
      return;
    }
    metricsText().then(
      ({ contentType, body }) => res.writeHead(200, { 'content-type': contentType }).end(body),
      () => res.writeHead(500, { 'content-type': 'text/plain' }).end('metrics unavailable\n'),
    );
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  const addr = server.address() as AddressInfo;
  const h = addr.family === 'IPv6' ? `[${addr.address}]` : addr.address;
  const url = `http://${h === '0.0.0.0' || h === '[::]' ? '127.0.0.1' : h}:${addr.port}/metrics`;
  return {
    url,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}
