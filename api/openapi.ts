import { createRequire } from 'node:module';
import { dirname } from 'node:path';
import { OpenAPIRegistry, OpenApiGeneratorV31, extendZodWithOpenApi, type ResponseConfig, type RouteConfig } from '@asteasolutions/zod-to-openapi';
import express, { Router } from 'express';
import { z } from 'zod';
import { batchBodySchema } from '../shared/batches.js';
import { JOB_STATUSES, STEPS } from '../shared/jobs.js';
import { kmsConnectionSchema, localKeySchema, templateSchema, WRAPPING_KEY_SPECS } from '../shared/resources.js';
import { uploadKeySchema } from '../shared/schemas/upload-key.js';
import { dsmConnectionSchema, hsmConnectionSchema, HSM_WRAPPING_ALGORITHMS, KMIP_VERSIONS } from '../shared/source-connections.js';
import { PROBLEM_TYPE } from './problem.js';
import { pageQuery } from './routes/batches.js';

/*
 * The OpenAPI 3.1 document of the HTTP API. Request bodies are the very zod schemas the routes validate
 * with (shared/); each is registered through a `.describe()` clone, so the validating schema itself is never
 * touched. Response bodies are documentation-only schemas of what the routes' view functions return.
 */

// Adds `.openapi()` to schemas constructed from here on (zod 4 copies prototype methods at construction).
extendZodWithOpenApi(z);

const APP_VERSION = '0.1.0';

let cached: ReturnType<OpenApiGeneratorV31['generateDocument']> | undefined;

/** The document (built once: registering a schema name twice would duplicate components). */
export function buildOpenApiDocument(): ReturnType<OpenApiGeneratorV31['generateDocument']> {
  cached ??= generate();
  return cached;
}

function generate(): ReturnType<OpenApiGeneratorV31['generateDocument']> {
  const registry = new OpenAPIRegistry();
  const bearer = registry.registerComponent('securitySchemes', 'bearerAuth', {
    type: 'http',
    scheme: 'bearer',
    bearerFormat: 'JWT',
    description: 'An HS256 JWT naming the account (`npm run token`).',
  });
  const secured = [{ [bearer.name]: [] }];

  // ---- request bodies: the validating schemas ---------------------------------------------------
  const UploadKeyRequest = registry.register('UploadKeyRequest', uploadKeySchema.describe('Body of an upload-key request (CCKM-compatible).'));
  const BatchRequest = registry.register(
    'BatchUploadKeyRequest',
    batchBodySchema.describe('A batch of upload-key requests: each item is validated as an UploadKeyRequest.'),
  );
  const KmsConnectionRequest = registry.register('KmsConnectionRequest', kmsConnectionSchema.describe('A KMS connection (AWS account and regions).'));
  const TemplateRequest = registry.register('PolicyTemplateRequest', templateSchema.describe('A key policy template.'));
  const LocalKeyRequest = registry.register('LocalKeyRequest', localKeySchema.describe('A local AES-256 key: generated, or imported as hex.'));
  const HsmConnectionRequest = registry.register(
    'HsmConnectionRequest',
    hsmConnectionSchema.describe('An HSM reached through PKCS#11 (source tier hsm-luna); the PIN is sealed and never returned.'),
  );
  const DsmConnectionRequest = registry.register(
    'DsmConnectionRequest',
    dsmConnectionSchema.describe('A KMIP server (source tier dsm) reached over mutual TLS; the client key is sealed and never returned.'),
  );

  // ---- responses: documentation only --------------------------------------------------------------
  const fieldError = z.object({ path: z.string(), message: z.string() });
  const Problem = registry.register(
    'Problem',
    z
      .object({
        type: z.string().openapi({ example: 'urn:keyferry:problem:validation_failed' }),
        title: z.string(),
        status: z.number().int(),
        detail: z.string(),
        code: z.string(),
        instance: z.string().optional(),
        errors: z.array(fieldError).optional(),
        request_id: z.string().optional().openapi({ description: 'The X-Request-Id of the request, to quote when reporting a problem.' }),
      })
      .catchall(z.unknown())
      .openapi({ description: 'An RFC 9457 problem.' }),
  );
  const jobError = z.object({ code: z.string(), message: z.string(), retryable: z.boolean() });
  const Job = registry.register(
    'Job',
    z.object({
      id: z.string(),
      type: z.literal('upload-key'),
      status: z.enum(JOB_STATUSES),
      step: z.enum(STEPS).nullable(),
      attempts: z.number().int(),
      max_attempts: z.number().int(),
      created_at: z.string(),
      updated_at: z.string(),
      finished_at: z.string().nullable(),
      batch_id: z.string().nullable(),
      batch_index: z.number().int().optional(),
      error: jobError.nullable(),
      result: z.record(z.string(), z.unknown()).nullable(),
      kms_key_arn: z.string().nullable(),
      deletion_scheduled_for: z.string().nullable(),
    }),
  );
  const UploadedKey = registry.register('UploadedKey', z.record(z.string(), z.unknown()).openapi({ description: 'The uploaded key resource (CCKM AWS key).' }));
  const Batch = registry.register(
    'Batch',
    z.object({
      id: z.string(),
      status: z.enum(['running', 'completed']),
      total: z.number().int(),
      counts: z.record(z.enum(JOB_STATUSES), z.number().int()),
      created_at: z.string(),
      updated_at: z.string(),
      finished_at: z.string().nullable(),
      callback_url: z.string().nullable(),
    }),
  );
  const Delivery = registry.register(
    'WebhookDelivery',
    z.object({
      id: z.string(),
      event_type: z.enum(['upload-key.succeeded', 'upload-key.failed', 'batch.completed']),
      url: z.string(),
      attempt: z.number().int(),
      at: z.string(),
      status_code: z.number().int().nullable(),
      latency_ms: z.number(),
      outcome: z.enum(['delivered', 'failed', 'gone', 'forbidden', 'skipped']),
      error: z.string().nullable(),
      next_attempt_at: z.string().nullable(),
    }),
  );
  const stamps = { id: z.string(), name: z.string(), created_at: z.string(), updated_at: z.string() };
  const KmsConnection = registry.register(
    'KmsConnection',
    z.object({
      ...stamps,
      account_id: z.string(),
      regions: z.array(z.string()),
      credentials_type: z.enum(['default', 'access_key']),
      aws_access_key_id: z.string().nullable(),
      endpoint: z.string().nullable(),
      wrapping_key_spec: z.enum(WRAPPING_KEY_SPECS).nullable(),
      quotas: z.record(z.string(), z.number()),
    }),
  );
  const Template = registry.register('PolicyTemplate', z.object({ ...stamps, account: z.string(), policy: z.record(z.string(), z.unknown()) }));
  const LocalKey = registry.register(
    'LocalKey',
    z.object({ ...stamps, algorithm: z.literal('AES'), size: z.literal(256), origin: z.enum(['generated', 'imported']) }),
  );
  const HsmConnection = registry.register(
    'HsmConnection',
    z.object({
      ...stamps,
      library: z.string(),
      token_label: z.string().nullable(),
      slot: z.number().int().nullable(),
      wrapping_algorithm: z.enum(HSM_WRAPPING_ALGORITHMS),
    }),
  );
  const DsmConnection = registry.register(
    'DsmConnection',
    z.object({
      ...stamps,
      host: z.string(),
      port: z.number().int(),
      server_name: z.string().nullable(),
      ca_certificate: z.string(),
      client_certificate: z.string(),
      kmip_version: z.enum(KMIP_VERSIONS).nullable(),
    }),
  );
  const list = <T extends z.ZodType>(item: T) => z.object({ resources: z.array(item), total: z.number().int() });

  // ---- helpers ---------------------------------------------------------------------------------------
  const json = (schema: z.ZodType, description: string, headers?: ResponseConfig['headers']): ResponseConfig => ({
    description,
    content: { 'application/json': { schema } },
    ...(headers ? { headers } : {}),
  });
  const problemResponse = (description: string): ResponseConfig => ({ description, content: { [PROBLEM_TYPE]: { schema: Problem } } });
  const sse = (description: string): ResponseConfig => ({
    description,
    content: { 'text/event-stream': { schema: z.string().openapi({ description: 'Server-Sent Events; resumes after `Last-Event-ID`.' }) } },
  });
  const location = { Location: { description: 'URL of the created or tracking resource.', schema: { type: 'string' as const } } };
  const retryAfter = { 'Retry-After': { description: 'Seconds to wait before polling.', schema: { type: 'integer' as const } } };
  const authErrors = {
    401: problemResponse('Missing or invalid bearer token.'),
    429: problemResponse('Rate limited.'),
    503: {
      ...problemResponse('Redis is unavailable, or (RS256/ES256 tokens) the JWT_JWKS_URL key set cannot be fetched; retry after Retry-After.'),
      headers: { 'Retry-After': { description: 'Seconds to wait before retrying.', schema: { type: 'integer' as const } } },
    },
  };
  const tooManyStreams = problemResponse('The account holds SSE_MAX_STREAMS_PER_ACCOUNT event streams open on this server already (`too_many_streams`).');
  const idParam = (what: string) => z.object({ id: z.string().openapi({ param: { description: `The ${what} id.` } }) });
  const bodyErrors = { 400: problemResponse('Invalid body (every offending field in `errors`).'), 413: problemResponse('Body too large.'), 415: problemResponse('Body is not JSON.') };
  const idempotencyKey = z.object({ 'idempotency-key': z.string().optional().openapi({ param: { description: 'Replays the first answer for the same key and body.' } }) });

  const route = (r: Omit<RouteConfig, 'security'> & { public?: boolean }) => {
    const { public: isPublic, ...rest } = r;
    registry.registerPath({ ...rest, ...(isPublic ? { security: [] } : { security: secured }) });
  };

  // ---- operational, unauthenticated ----------------------------------------------------------------
  route({ method: 'get', path: '/healthz', tags: ['operations'], summary: 'Liveness', public: true, responses: { 200: json(z.object({ status: z.literal('ok') }), 'Alive.') } });
  route({
    method: 'get',
    path: '/readyz',
    tags: ['operations'],
    summary: 'Readiness (Redis answers)',
    public: true,
    responses: { 200: json(z.object({ status: z.literal('ready'), redis: z.literal('ok') }), 'Ready.'), 503: problemResponse('Redis does not answer.') },
  });
  route({
    method: 'get',
    path: '/metrics',
    tags: ['operations'],
    summary: 'Prometheus metrics',
    public: true,
    responses: { 200: { description: 'Prometheus text exposition.', content: { 'text/plain': { schema: z.string() } } } },
  });
  route({
    method: 'get',
    path: '/openapi.json',
    tags: ['operations'],
    summary: 'This OpenAPI document',
    public: true,
    responses: { 200: json(z.record(z.string(), z.unknown()), 'The OpenAPI 3.1 document.') },
  });
  route({
    method: 'get',
    path: '/docs',
    tags: ['operations'],
    summary: 'API reference (Swagger UI)',
    public: true,
    responses: { 200: { description: 'HTML page rendering /openapi.json.', content: { 'text/html': { schema: z.string() } } } },
  });

  // ---- upload-key ---------------------------------------------------------------------------------
  route({
    method: 'post',
    path: '/api/v1/cckm/aws/upload-key',
    tags: ['upload-key'],
    summary: 'Upload a key into AWS KMS (asynchronous job)',
    request: {
      headers: idempotencyKey.extend({ prefer: z.string().optional().openapi({ param: { description: '`wait=N` (RFC 7240): wait up to N seconds for the job to finish.' } }) }),
      body: { required: true, content: { 'application/json': { schema: UploadKeyRequest } } },
    },
    responses: {
      201: json(UploadedKey, 'The job finished within `Prefer: wait`: the uploaded key.', location),
      202: json(Job, 'Accepted: the job to poll.', { ...location, ...retryAfter }),
      ...bodyErrors,
      409: problemResponse('Idempotency-Key reused with another body.'),
      422: problemResponse('The job failed (within `Prefer: wait`).'),
      502: problemResponse('The job failed retryably (within `Prefer: wait`).'),
      ...authErrors,
    },
  });
  route({
    method: 'post',
    path: '/api/v1/cckm/aws/upload-key/batch',
    tags: ['batches'],
    summary: 'Upload many keys (one job per item)',
    request: { headers: idempotencyKey, body: { required: true, content: { 'application/json': { schema: BatchRequest } } } },
    responses: { 202: json(Batch, 'Accepted: the batch to poll.', { ...location, ...retryAfter }), ...bodyErrors, 409: problemResponse('Idempotency-Key reused with another body.'), ...authErrors },
  });
  route({
    method: 'get',
    path: '/api/v1/cckm/aws/keys/{id}',
    tags: ['upload-key'],
    summary: 'An uploaded key',
    request: { params: idParam('key') },
    responses: { 200: json(UploadedKey, 'The key.'), 404: problemResponse('No such key.'), ...authErrors },
  });

  // ---- jobs ----------------------------------------------------------------------------------------
  const jobId = { params: idParam('job') };
  route({ method: 'get', path: '/api/v1/jobs/{id}', tags: ['jobs'], summary: 'A job', request: jobId, responses: { 200: json(Job, 'The job.'), 404: problemResponse('No such job.'), ...authErrors } });
  route({
    method: 'delete',
    path: '/api/v1/jobs/{id}',
    tags: ['jobs'],
    summary: 'Cancel a job that has not started',
    request: jobId,
    responses: { 200: json(Job, 'The canceled job.'), 404: problemResponse('No such job.'), 409: problemResponse('The job has started.'), ...authErrors },
  });
  route({
    method: 'get',
    path: '/api/v1/jobs/{id}/events',
    tags: ['jobs'],
    summary: "The job's status changes as Server-Sent Events",
    request: jobId,
    responses: { 200: sse('`job` events until the job ends.'), 404: problemResponse('No such job.'), ...authErrors, 429: tooManyStreams },
  });
  route({
    method: 'get',
    path: '/api/v1/jobs/{id}/deliveries',
    tags: ['webhooks'],
    summary: "The job's webhook delivery attempts",
    request: jobId,
    responses: { 200: json(z.object({ deliveries: z.array(Delivery) }), 'Oldest first.'), 404: problemResponse('No such job.'), ...authErrors },
  });

  // ---- batches -------------------------------------------------------------------------------------
  const batchId = { params: idParam('batch') };
  route({ method: 'get', path: '/api/v1/batches/{id}', tags: ['batches'], summary: 'A batch', request: batchId, responses: { 200: json(Batch, 'The batch.'), 404: problemResponse('No such batch.'), ...authErrors } });
  route({
    method: 'delete',
    path: '/api/v1/batches/{id}',
    tags: ['batches'],
    summary: 'Cancel the jobs no worker has started',
    request: batchId,
    responses: { 200: json(Batch.extend({ canceled: z.number().int() }), 'The batch, with how many jobs were canceled.'), 404: problemResponse('No such batch.'), ...authErrors },
  });
  route({
    method: 'get',
    path: '/api/v1/batches/{id}/jobs',
    tags: ['batches'],
    summary: "A page of the batch's jobs",
    request: {
      ...batchId,
      query: pageQuery.describe('A page of jobs: `cursor` is the `next_cursor` of the previous page.'),
    },
    responses: { 200: json(z.object({ jobs: z.array(Job), next_cursor: z.string().nullable() }), 'The page.'), 400: problemResponse('Invalid query.'), 404: problemResponse('No such batch.'), ...authErrors },
  });
  route({
    method: 'get',
    path: '/api/v1/batches/{id}/events',
    tags: ['batches'],
    summary: "The batch's progress as Server-Sent Events",
    request: batchId,
    responses: { 200: sse('`snapshot` and job events, ending with `completed`.'), 404: problemResponse('No such batch.'), ...authErrors, 429: tooManyStreams },
  });
  route({
    method: 'post',
    path: '/api/v1/batches/{id}/retry-failed',
    tags: ['batches'],
    summary: "Re-enqueue the batch's failed jobs",
    request: batchId,
    responses: { 202: json(Batch.extend({ retried: z.number().int() }), 'Accepted: the batch, with how many jobs were re-enqueued.', location), 404: problemResponse('No such batch.'), ...authErrors },
  });
  route({
    method: 'get',
    path: '/api/v1/batches/{id}/deliveries',
    tags: ['webhooks'],
    summary: "The batch's webhook delivery attempts",
    request: batchId,
    responses: { 200: json(z.object({ deliveries: z.array(Delivery) }), 'Oldest first.'), 404: problemResponse('No such batch.'), ...authErrors },
  });

  // ---- resources -----------------------------------------------------------------------------------
  const resources: { path: string; tag: string; what: string; request: z.ZodType; view: z.ZodType }[] = [
    { path: '/api/v1/cckm/aws/kms', tag: 'kms-connections', what: 'KMS connection', request: KmsConnectionRequest, view: KmsConnection },
    { path: '/api/v1/cckm/aws/templates', tag: 'policy-templates', what: 'policy template', request: TemplateRequest, view: Template },
    { path: '/api/v1/vault/keys2', tag: 'local-keys', what: 'local key', request: LocalKeyRequest, view: LocalKey },
    { path: '/api/v1/cckm/hsm', tag: 'hsm-connections', what: 'HSM connection', request: HsmConnectionRequest, view: HsmConnection },
    { path: '/api/v1/cckm/dsm', tag: 'dsm-connections', what: 'DSM (KMIP) connection', request: DsmConnectionRequest, view: DsmConnection },
  ];
  for (const r of resources) {
    route({
      method: 'post',
      path: r.path,
      tags: [r.tag],
      summary: `Create a ${r.what}`,
      request: { body: { required: true, content: { 'application/json': { schema: r.request } } } },
      responses: { 201: json(r.view, 'Created.', location), ...bodyErrors, ...authErrors },
    });
    route({ method: 'get', path: r.path, tags: [r.tag], summary: `List ${r.what}s`, responses: { 200: json(list(r.view), 'All of the account’s.'), ...authErrors } });
    route({
      method: 'get',
      path: `${r.path}/{id}`,
      tags: [r.tag],
      summary: `A ${r.what}`,
      request: { params: idParam(r.what) },
      responses: { 200: json(r.view, `The ${r.what}.`), 404: problemResponse(`No such ${r.what}.`), ...authErrors },
    });
  }

  // ---- webhooks ------------------------------------------------------------------------------------
  route({
    method: 'post',
    path: '/api/v1/webhooks/secret',
    tags: ['webhooks'],
    summary: "Create or rotate the account's webhook signing secret",
    responses: {
      201: json(z.object({ secret: z.string(), previous_valid_until: z.string().nullable(), created_at: z.string() }), 'The new secret (shown once).'),
      ...authErrors,
    },
  });

  route({
    method: 'get',
    path: '/api/v1/webhooks/gone',
    tags: ['webhooks'],
    summary: 'The callback URLs that answered 410 Gone: events to them are skipped',
    responses: { 200: json(z.object({ urls: z.array(z.string()) }), 'Sorted, at most 1,000; each is forgotten 30 days after its own last 410.'), ...authErrors },
  });
  route({
    method: 'delete',
    path: '/api/v1/webhooks/gone',
    tags: ['webhooks'],
    summary: 'Deliver to a gone URL again (later events only; skipped ones are not sent again)',
    request: { query: z.object({ url: z.string().openapi({ description: 'The URL, exactly as listed.' }) }) },
    responses: { 204: { description: 'Cleared.' }, 400: problemResponse('Not one non-empty `url` query parameter.'), 404: problemResponse('Not among the gone URLs.'), ...authErrors },
  });

  return new OpenApiGeneratorV31(registry.definitions).generateDocument({
    openapi: '3.1.0',
    info: {
      title: 'keyferry',
      version: APP_VERSION,
      description: 'Bring-your-own-key upload service: CCKM-compatible upload-key API into AWS KMS imported key material. Errors are `application/problem+json`.',
    },
    servers: [{ url: '/' }],
    security: secured,
  });
}

const DOCS_HTML = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>keyferry API reference</title>
<link rel="stylesheet" href="/docs/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/docs/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({ url: '/openapi.json', dom_id: '#swagger-ui', deepLinking: true });
</script>
</body>
</html>
`;

/** The swagger-ui-dist folder (what its getAbsoluteFSPath() answers), resolved from this package's dependencies: no CDN. */
function swaggerUiDir(): string {
  return dirname(createRequire(import.meta.url).resolve('swagger-ui-dist/package.json'));
}

/** `GET /openapi.json` and the Swagger UI page at `GET /docs` (its assets under /docs/), unauthenticated. */
export function openApiRoutes(): Router {
  const router = Router();
  router.get('/openapi.json', (_req, res) => void res.json(buildOpenApiDocument()));
  router.get('/docs', (_req, res) => void res.type('html').send(DOCS_HTML));
  router.use('/docs', express.static(swaggerUiDir(), { index: false }));
  return router;
}
