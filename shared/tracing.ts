import type { Tracer } from '@opentelemetry/api';
import type { Telemetry } from 'bullmq';
import type { Config } from './config.js';

/**
 * Optional OpenTelemetry tracing of the BullMQ queues (bullmq-otel), the API's requests (api/request-tracing.ts)
 * and the workers' KMS requests (worker/kms-clients.ts), exported over OTLP/HTTP (JSON).
 *
 * Off unless OTEL_EXPORTER_OTLP_ENDPOINT is set: then nothing of the OpenTelemetry SDK is even loaded
 * (the imports below are dynamic) and queues and workers are built without a `telemetry` option, so BullMQ
 * takes its untraced path. On, every Queue and Worker carries `telemetry`: the `add` span of a job is
 * stored with the job (its trace context, in `opts.telemetry.metadata`) and the worker's `process` span
 * continues that trace, across processes.
 */

export interface Tracing {
  serviceName: string;
  /** Exports the spans ended so far. */
  forceFlush(): Promise<void>;
  /**
   * Exports what is left and stops; call it when the process closes. Never rejects and waits at most
   * `timeoutMs`, so a collector that is away does not hold up a shutdown.
   */
  shutdown(timeoutMs?: number): Promise<void>;
}

/** The telemetry every BullMQ Queue and Worker of this process gets; undefined while tracing is off. */
let telemetry: Telemetry | undefined;

/** The OpenTelemetry API and keyferry's tracer while tracing is on; undefined while it is off. */
let spans: { otel: typeof import('@opentelemetry/api'); tracer: Tracer } | undefined;

/** The OpenTelemetry API and keyferry's tracer, for spans of its own; undefined while tracing is off. */
export function tracingApi(): typeof spans {
  return spans;
}

/** Spread into BullMQ Queue and Worker options: `{ telemetry }` when tracing is on, `{}` otherwise. */
export function bullTelemetry(): { telemetry?: Telemetry } {
  return telemetry ? { telemetry } : {};
}

/** The OTLP/HTTP traces URL: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT as is, else the base endpoint + `/v1/traces`. */
export function tracesUrl(endpoint: string, env: NodeJS.ProcessEnv = process.env): string {
  const specific = env.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT;
  if (specific) return specific;
  return `${endpoint.replace(/\/+$/, '')}/v1/traces`;
}

/**
 * Starts tracing when OTEL_EXPORTER_OTLP_ENDPOINT is set, before any queue or worker is made; answers
 * undefined (and loads nothing) otherwise. `defaultServiceName` (keyferry-api, keyferry-worker) yields to
 * OTEL_SERVICE_NAME. Spans are batched (BatchSpanProcessor: OTEL_BSP_* tune it) and sent to the OTLP/HTTP
 * JSON endpoint; OTEL_EXPORTER_OTLP_HEADERS, _TIMEOUT and _COMPRESSION are read by the exporter itself.
 * Registers the provider globally (with the W3C trace-context propagator and an AsyncLocalStorage context
 * manager), so a process starts tracing once.
 */
export async function startTracing(
  config: Pick<Config, 'OTEL_EXPORTER_OTLP_ENDPOINT' | 'OTEL_SERVICE_NAME'>,
  defaultServiceName: string,
): Promise<Tracing | undefined> {
  const endpoint = config.OTEL_EXPORTER_OTLP_ENDPOINT;
  if (!endpoint) return undefined;
  if (telemetry) throw new Error('tracing is already started in this process');
  const [{ NodeTracerProvider, BatchSpanProcessor }, { OTLPTraceExporter }, { defaultResource, detectResources, envDetector, resourceFromAttributes }, { BullMQOtel }, otel] =
    await Promise.all([
      import('@opentelemetry/sdk-trace-node'),
      import('@opentelemetry/exporter-trace-otlp-http'),
      import('@opentelemetry/resources'),
      import('bullmq-otel'),
      import('@opentelemetry/api'),
    ]);
  // Later merges win: the SDK's defaults, our name, OTEL_RESOURCE_ATTRIBUTES / OTEL_SERVICE_NAME of the
  // environment, then OTEL_SERVICE_NAME of the parsed config.
  let resource = defaultResource()
    .merge(resourceFromAttributes({ 'service.name': defaultServiceName }))
    .merge(detectResources({ detectors: [envDetector] }));
  if (config.OTEL_SERVICE_NAME) resource = resource.merge(resourceFromAttributes({ 'service.name': config.OTEL_SERVICE_NAME }));
  const serviceName = String(resource.attributes['service.name']);

  const exporter = new OTLPTraceExporter({ url: tracesUrl(endpoint) });
  // Attribute values are cut at 1 KiB (a path no route matched can be 16 KiB long).
  const provider = new NodeTracerProvider({ resource, spanProcessors: [new BatchSpanProcessor(exporter)], spanLimits: { attributeValueLengthLimit: 1024 } });
  provider.register();
  telemetry = new BullMQOtel({ tracerName: 'keyferry', version: '0.1.0' });
  spans = { otel, tracer: otel.trace.getTracer('keyferry', '0.1.0') };

  let stopped: Promise<void> | undefined;
  return {
    serviceName,
    forceFlush: () => provider.forceFlush(),
    shutdown(timeoutMs = 5000) {
      stopped ??= provider.shutdown().catch(() => undefined);
      let timer: NodeJS.Timeout | undefined;
      const late = new Promise<void>((resolve) => {
        timer = setTimeout(resolve, timeoutMs);
        timer.unref();
      });
      return Promise.race([stopped, late]).finally(() => clearTimeout(timer));
    },
  };
}
