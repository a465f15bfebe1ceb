import { KMSClient } from '@aws-sdk/client-kms';
import type { SecretBox } from '../shared/crypto.js';
import { PipelineError } from '../shared/errors.js';
import { kmsEndpointProblem, type KmsEndpointPolicy } from '../shared/kms-endpoints.js';
import { kmsSecretContext, type KmsConnection } from '../shared/resources.js';
import { tracingApi } from '../shared/tracing.js';

/** The HTTP settings of keyferry's KMS clients for a deadline of `timeoutMs` per call (see KmsClients). */
export function kmsRequestHandler(timeoutMs: number) {
  return { requestTimeout: timeoutMs, throwOnRequestTimeout: true, socketTimeout: timeoutMs, connectionTimeout: Math.min(timeoutMs, 5000) };
}

/**
 * While tracing is on, a CLIENT span per KMS request (`KMS <Operation>`), a child of the job's `process` span:
 * the operation, the region, the request id AWS answered with, and the error's name when it failed. Nothing
 * of the request or the answer (key material is wrapped in ImportKeyMaterial's body) is recorded.
 */
function traceKmsRequests(client: KMSClient, region: string): void {
  const api = tracingApi();
  if (!api) return;
  const { otel, tracer } = api;
  client.middlewareStack.add(
    (next, context) => async (args) => {
      const operation = String(context.commandName ?? 'unknown').replace(/Command$/, '');
      const span = tracer.startSpan(`KMS ${operation}`, {
        kind: otel.SpanKind.CLIENT,
        attributes: { 'rpc.system': 'aws-api', 'rpc.service': 'KMS', 'rpc.method': operation, 'cloud.region': region },
      });
      // AWS's request id, on an answer's output or on an error alike.
      const noteRequestId = (answer: unknown) => {
        const requestId = (answer as { $metadata?: { requestId?: string } } | undefined)?.$metadata?.requestId;
        if (requestId) span.setAttribute('aws.request_id', requestId);
      };
      try {
        const out = await next(args);
        noteRequestId(out.output);
        return out;
      } catch (err) {
        noteRequestId(err);
        span.setAttribute('error.type', (err as Error).name);
        span.setStatus({ code: otel.SpanStatusCode.ERROR });
        throw err;
      } finally {
        span.end();
      }
    },
    { step: 'initialize', name: 'keyferryTracing' },
  );
}

/**
 * One KMS client per (connection, region), reused across jobs. The SDK does not retry (maxAttempts 1):
 * retries are the job's, with backoff, so every attempt is visible in the job record.
 *
 * Each call's deadline (`timeoutMs`, KMS_TIMEOUT_MS) is the client's: the answer must start within it (the
 * request timeout, thrown as TimeoutError), and its body may then pause no longer than that (the socket
 * timeout). Calls pass no per-call options, so the SDK resolves each command's middleware once per client
 * (`cacheMiddleware`) rather than on every call (README, "What changed for speed").
 */
export class KmsClients {
  readonly #clients = new Map<string, KMSClient>();

  constructor(
    private readonly box: SecretBox,
    private readonly timeoutMs: number,
    /** KMS_ENDPOINT_HOSTS and ALLOW_HTTP_KMS_ENDPOINT: a connection whose endpoint they refuse gets no client. */
    private readonly endpoints: KmsEndpointPolicy,
  ) {}

  /**
   * The connection's client for `region`. Throws (a permanent `kms_endpoint_not_allowed`) for a connection whose
   * endpoint the operator's settings refuse (made before they were narrowed) or that is another region's, before
   * any request.
   */
  get(conn: KmsConnection, region: string): KMSClient {
    const cacheKey = `${conn.id}|${region}|${conn.updated_at}`;
    let client = this.#clients.get(cacheKey);
    if (!client) {
      // Checked once per client: the settings are the process's, and a connection's endpoint is part of its
      // record as of updated_at; a refused connection gets no client, so it is checked again at every call.
      const problem = conn.endpoint ? kmsEndpointProblem(conn.endpoint, this.endpoints, [region]) : undefined;
      if (problem) throw new PipelineError('kms_endpoint_not_allowed', `The KMS connection "${conn.name}": its endpoint is refused. ${problem}`, false);
      const creds = conn.credentials;
      client = new KMSClient({
        region,
        maxAttempts: 1,
        cacheMiddleware: true,
        requestHandler: kmsRequestHandler(this.timeoutMs),
        ...(conn.endpoint ? { endpoint: conn.endpoint } : {}),
        ...(creds.type === 'access_key'
          ? {
              credentials: {
                accessKeyId: creds.access_key_id,
                secretAccessKey: this.box.openString(creds.secret_sealed, kmsSecretContext(conn.account, conn.id)),
              },
            }
          : {}),
      });
      traceKmsRequests(client, region);
      this.#clients.set(cacheKey, client);
    }
    return client;
  }

  destroy(): void {
    for (const c of this.#clients.values()) c.destroy();
    this.#clients.clear();
  }
}
