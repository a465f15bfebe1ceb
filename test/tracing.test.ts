import { randomBytes } from 'node:crypto';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { readFileSync } from 'node:fs';
import { gunzipSync } from 'node:zlib';
import { Queue } from 'bullmq';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createUploadQueue } from '../shared/queues.js';
import { bullTelemetry, startTracing, tracesUrl } from '../shared/tracing.js';
import { runEntry, type Child } from './helpers/child.js';
import { seedKms, seedLocalKey, startStack, waitForJob, type TestStack } from './helpers/stack.js';

const example = JSON.parse(readFileSync(new URL('./fixtures/spec-example-request.json', import.meta.url), 'utf8')) as Record<string, unknown>;

/** One span as OTLP/HTTP JSON carries it, with its resource's service.name. */
interface ReceivedSpan {
  service: string;
  scope: string;
  traceId: string;
  spanId: string;
  parentSpanId: string | undefined;
  name: string;
  kind: number;
  attributes: Record<string, unknown>;
}

const SPAN_KIND_SERVER = 2;
const SPAN_KIND_CLIENT = 3;
const SPAN_KIND_PRODUCER = 4;
const SPAN_KIND_CONSUMER = 5;

type OtlpValue = { stringValue?: string; intValue?: string | number; boolValue?: boolean };
type OtlpAttribute = { key: string; value: OtlpValue };
interface OtlpExport {
  resourceSpans: {
    resource: { attributes: OtlpAttribute[] };
    scopeSpans: { scope: { name: string }; spans: { traceId: string; spanId: string; parentSpanId?: string; name: string; kind: number; attributes?: OtlpAttribute[] }[] }[];
  }[];
}

const attrs = (list: OtlpAttribute[] = []) => Object.fromEntries(list.map((a) => [a.key, a.value.stringValue ?? a.value.intValue ?? a.value.boolValue]));

/** A minimal OTLP/HTTP collector on loopback: POST /v1/traces, JSON (gzip allowed); anything else fails the test. */
class OtlpReceiver {
  readonly spans: ReceivedSpan[] = [];
  readonly problems: string[] = [];
  url = '';
  readonly #server = http.createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      try {
        if (req.method !== 'POST' || req.url !== '/v1/traces') throw new Error(`unexpected ${req.method} ${req.url}`);
        if (!String(req.headers['content-type']).startsWith('application/json')) throw new Error(`not JSON: ${req.headers['content-type']}`);
        const body = req.headers['content-encoding'] === 'gzip' ? gunzipSync(Buffer.concat(chunks)) : Buffer.concat(chunks);
        const doc = JSON.parse(body.toString('utf8')) as OtlpExport;
        for (const rs of doc.resourceSpans) {
          const service = String(attrs(rs.resource.attributes)['service.name']);
          for (const ss of rs.scopeSpans) {
            for (const s of ss.spans) {
              this.spans.push({ service, scope: ss.scope.name, traceId: s.traceId, spanId: s.spanId, parentSpanId: s.parentSpanId || undefined, name: s.name, kind: s.kind, attributes: attrs(s.attributes) });
            }
          }
        }
        res.writeHead(200, { 'content-type': 'application/json' }).end('{}');
      } catch (err) {
        this.problems.push((err as Error).message);
        res.writeHead(400).end();
      }
    });
  });

  async start(): Promise<void> {
    await new Promise<void>((resolve) => this.#server.listen(0, '127.0.0.1', resolve));
    this.url = `http://127.0.0.1:${(this.#server.address() as AddressInfo).port}`;
  }

  async close(): Promise<void> {
    this.#server.closeAllConnections();
    await new Promise((resolve) => this.#server.close(resolve));
  }
}

let stack: TestStack;
let collector: OtlpReceiver;
let token: string;
let childEnv: Record<string, string>;
const children: Child[] = [];

beforeAll(async () => {
  collector = new OtlpReceiver();
  await collector.start();
  // The in-process stack (no tracing) owns the emulator and seeds data; the processes under test are the
  // real entry points, as children with OTEL_EXPORTER_OTLP_ENDPOINT set.
  stack = await startStack({ name: 'tracing', worker: false });
  token = await stack.token('acme');
  await seedKms(stack, token);
  await seedLocalKey(stack, token, 'test-key');
  childEnv = stack.childEnv({
    LOG_LEVEL: 'info',
    OTEL_EXPORTER_OTLP_ENDPOINT: collector.url,
  });
});
afterAll(async () => {
  for (const child of children) if (child.proc.exitCode === null) child.proc.kill('SIGKILL');
  await stack?.close();
  await collector?.close();
});

describe('tracing off (no OTEL_EXPORTER_OTLP_ENDPOINT)', () => {
  it('starts nothing, and queues are made without telemetry', async () => {
    expect(await startTracing({ OTEL_EXPORTER_OTLP_ENDPOINT: undefined, OTEL_SERVICE_NAME: undefined }, 'keyferry-api')).toBeUndefined();
    expect(bullTelemetry()).toEqual({});
    const queue = createUploadQueue(stack.redis as never, { bullPrefix: `{${stack.config.KEYFERRY_PREFIX}}` } as never);
    expect(queue.opts.telemetry).toBeUndefined();
    await queue.close();
  });

  it('sends to <endpoint>/v1/traces, or to OTEL_EXPORTER_OTLP_TRACES_ENDPOINT as given', () => {
    expect(tracesUrl('http://collector:4318/', {})).toBe('http://collector:4318/v1/traces');
    expect(tracesUrl('http://collector:4318', { OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: 'http://other:4318/custom' })).toBe('http://other:4318/custom');
  });
});

describe('tracing on: the API and a worker as real processes', () => {
  it('when one upload runs, then the add span (keyferry-api) and the process span (keyferry-worker) reach the collector in one trace, flushed on SIGTERM', async () => {
    const api = runEntry('api/main.ts', childEnv);
    const worker = runEntry('worker/main.ts', childEnv);
    children.push(api, worker);
    const [{ url }] = (await Promise.all([api.waitForLog('api listening'), worker.waitForLog('worker started')])) as [{ url: string }, unknown];
    expect((await api.waitForLog('tracing on')).service_name).toBe('keyferry-api');
    expect((await worker.waitForLog('tracing on')).service_name).toBe('keyferry-worker');

    // Probes get no span.
    expect((await fetch(`${url}/healthz`)).status).toBe(200);
    // The caller's own trace, which the API's span continues.
    const [callerTrace, callerSpan] = [randomBytes(16).toString('hex'), randomBytes(8).toString('hex')];
    const res = await fetch(`${url}/api/v1/cckm/aws/upload-key`, {
      method: 'POST',
      headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json', traceparent: `00-${callerTrace}-${callerSpan}-01`, baggage: 'stowaway=big-enough-to-matter' },
      body: JSON.stringify({ ...example, aws_param: { Alias: 'traced-upload' } }),
    });
    expect(res.status).toBe(202);
    const job = (await res.json()) as { id: string };
    // A request the rate limit or a body check answers is named by its method (the limit's route has two paths).
    const refused = await fetch(`${url}/api/v1/cckm/aws/upload-key`, { method: 'POST', headers: { authorization: `Bearer ${token}`, 'content-type': 'text/plain' }, body: 'x' });
    expect(refused.status).toBe(415);
    expect((await waitForJob(stack, token, job.id)).status).toBe('succeeded');

    // The batch processor would wait up to 5 s; closing the processes must flush what is left.
    api.proc.kill('SIGTERM');
    worker.proc.kill('SIGTERM');
    expect(await api.exited).toEqual({ code: 0, signal: null });
    expect(await worker.exited).toEqual({ code: 0, signal: null });

    expect(collector.problems).toEqual([]);
    const add = collector.spans.filter((s) => s.name === 'add upload-key.upload-key' && s.attributes['bullmq.job.id'] === job.id);
    const processed = collector.spans.filter((s) => s.name === 'process upload-key' && s.attributes['bullmq.job.id'] === job.id);
    expect(add).toHaveLength(1);
    expect(processed).toHaveLength(1);
    const [a, p] = [add[0] as ReceivedSpan, processed[0] as ReceivedSpan];
    expect(a).toMatchObject({ service: 'keyferry-api', scope: 'keyferry', kind: SPAN_KIND_PRODUCER });
    expect(a.attributes['bullmq.queue.name']).toBe('upload-key');
    expect(p).toMatchObject({ service: 'keyferry-worker', scope: 'keyferry', kind: SPAN_KIND_CONSUMER });
    // Linked through the job: same trace, and the worker's span is a child of the API's.
    expect(a.traceId).toMatch(/^[0-9a-f]{32}$/);
    expect(a.traceId).not.toBe('0'.repeat(32));
    expect(p.traceId).toBe(a.traceId);
    expect(p.parentSpanId).toBe(a.spanId);

    // The request's span: in the caller's trace, the parent of the add span.
    const server = collector.spans.filter((s) => s.kind === SPAN_KIND_SERVER && s.traceId === callerTrace);
    expect(server).toHaveLength(1);
    expect(server[0]).toMatchObject({
      service: 'keyferry-api',
      name: 'POST /api/v1/cckm/aws/upload-key',
      parentSpanId: callerSpan,
      attributes: { 'http.request.method': 'POST', 'http.route': '/api/v1/cckm/aws/upload-key', 'url.path': '/api/v1/cckm/aws/upload-key', 'http.response.status_code': 202 },
    });
    expect(a.traceId).toBe(callerTrace);
    expect(a.parentSpanId).toBe(server[0]?.spanId);

    // The worker's KMS requests: one span each, children of the process span, none of them failed.
    const kms = collector.spans.filter((s) => s.service === 'keyferry-worker' && s.name.startsWith('KMS ') && s.traceId === callerTrace);
    expect(kms.map((s) => s.name).sort()).toEqual(
      ['CreateAlias', 'CreateKey', 'DescribeKey', 'GetKeyPolicy', 'GetKeyRotationStatus', 'GetParametersForImport', 'ImportKeyMaterial', 'ListAliases', 'ListResourceTags'].map((o) => `KMS ${o}`),
    );
    for (const k of kms) {
      expect(k).toMatchObject({ kind: SPAN_KIND_CLIENT, parentSpanId: p.spanId, attributes: { 'rpc.service': 'KMS', 'cloud.region': example.region } });
      expect(k.attributes['aws.request_id']).toEqual(expect.any(String));
      expect(k.attributes['error.type']).toBeUndefined();
    }
    expect(collector.spans.filter((s) => s.kind === SPAN_KIND_SERVER).map((s) => [s.name, s.attributes['http.response.status_code']])).toEqual([
      ['POST /api/v1/cckm/aws/upload-key', 202],
      ['POST', 415],
    ]);
    // The job carries the caller's trace context, not its baggage.
    // (BullMQ stores opts.telemetry.metadata, the serialised context, as `tm`.)
    const opts = JSON.parse((await stack.redis.hget(`{${stack.config.KEYFERRY_PREFIX}}:upload-key:${job.id}`, 'opts')) ?? '{}') as { tm?: string };
    expect(opts.tm).toContain(callerTrace);
    expect(JSON.stringify(opts)).not.toContain('stowaway');
    // Nothing of the key material or the token went into any span.
    const everything = JSON.stringify(collector.spans);
    expect(everything).not.toContain(token);
  });
});

describe('tracing on in this process', () => {
  it('honours OTEL_SERVICE_NAME, gives new queues telemetry, and forceFlush exports without waiting for the batch', async () => {
    const before = collector.spans.length;
    const tracing = await startTracing({ OTEL_EXPORTER_OTLP_ENDPOINT: collector.url, OTEL_SERVICE_NAME: 'keyferry-custom' }, 'keyferry-api');
    expect(tracing?.serviceName).toBe('keyferry-custom');
    const queue = new Queue('tracing-probe', { connection: stack.redis, prefix: `{${stack.config.KEYFERRY_PREFIX}}`, ...bullTelemetry() });
    try {
      expect(queue.opts.telemetry).toBeDefined();
      const job = await queue.add('probe', { n: 1 });
      await tracing?.forceFlush();
      const spans = collector.spans.slice(before).filter((s) => s.name === 'add tracing-probe.probe');
      expect(spans).toHaveLength(1);
      expect(spans[0]).toMatchObject({ service: 'keyferry-custom', kind: SPAN_KIND_PRODUCER, attributes: { 'bullmq.job.id': job.id } });
    } finally {
      await queue.close();
      await tracing?.shutdown();
    }
  });
});
