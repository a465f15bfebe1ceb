import { z } from 'zod';
import { AWS_KMS_ENDPOINT_HOSTS, validHostPattern } from './kms-endpoints.js';
import { kmsQuotaListSchema } from './kms-quotas.js';
import { hsmTokenListSchema } from './source-connections.js';
import { parseCidrs } from './ssrf.js';

/** Jobs a worker process holds ahead of its slots, unless WORKER_PREFETCH says otherwise. */
export const DEFAULT_WORKER_PREFETCH = 1;

/** Every setting keyferry reads, with its default. Parsed once at start; a bad value stops the process. */
const boolFromEnv = z
  .enum(['true', 'false', '1', '0'])
  .transform((v) => v === 'true' || v === '1');

const masterKey = z
  .string()
  .refine((v) => decodeKey(v) !== undefined, '32 bytes, as 64 hex characters or base64')
  .transform((v) => decodeKey(v) as Buffer);

export const configSchema = z.object({
  /** Redis server for queues and stores. */
  REDIS_URL: z.string().url().default('redis://127.0.0.1:6379'),
  /** Comma-separated host:port list; when set, a Redis Cluster client is used instead of REDIS_URL. */
  REDIS_CLUSTER_NODES: z.string().optional(),
  /** Namespace of every Redis key keyferry writes (the BullMQ prefix is `{PREFIX}`). */
  KEYFERRY_PREFIX: z.string().regex(/^[A-Za-z0-9_.:-]{1,64}$/).default('keyferry'),
  /** AES-256 key (64 hex or base64) that encrypts secrets and local key material at rest. */
  KEYFERRY_MASTER_KEY: masterKey,
  /** HS256 secret that signs and verifies bearer tokens (at least 32 characters). */
  JWT_SECRET: z.string().min(32),
  /** Expected `iss` / `aud` of tokens, when set. */
  JWT_ISSUER: z.string().optional(),
  JWT_AUDIENCE: z.string().optional(),
  /**
   * A JSON Web Key Set URL; when set, RS256 and ES256 tokens are verified against its keys (fetched and
   * cached by kid). HS256 tokens signed with JWT_SECRET stay accepted either way.
   */
  JWT_JWKS_URL: z.url({ protocol: /^https?$/, message: 'Must be an http(s) URL.' }).optional(),
  /** Intake (POST upload-key and upload-key/batch) requests per second and account, refilling a token bucket. */
  INTAKE_RATE_PER_SECOND: z.coerce.number().positive().max(1_000_000).default(50),
  /** Size of that bucket: the requests an account may send at once after a quiet spell. */
  INTAKE_BURST: z.coerce.number().int().min(1).max(1_000_000).default(100),
  /**
   * How long a batch may stay recorded and not enqueued (its request died between the two, or its enqueue and
   * then its undo failed) before an API process takes it back (Intake.recoverStrandedBatches); API processes
   * look for such batches every quarter of this, at least every minute. It must exceed by far the longest a
   * batch request takes (a 10,000-item batch: about a second here): a recovery takes over a request still under way.
   */
  BATCH_RECOVERY_AFTER_MS: z.coerce.number().int().min(10_000).max(86_400_000).default(300_000),
  /** API listen port and host. */
  PORT: z.coerce.number().int().min(0).max(65535).default(8080),
  HOST: z.string().default('0.0.0.0'),
  /** Upper bound of `Prefer: wait=N`, seconds. */
  MAX_PREFER_WAIT_SECONDS: z.coerce.number().int().min(0).max(60).default(60),
  /** Port of a worker process's Prometheus `GET /metrics` listener (on HOST); 0 = ephemeral. */
  WORKER_METRICS_PORT: z.coerce.number().int().min(0).max(65535).default(9464),
  /** Jobs processed at once by one worker process. */
  WORKER_CONCURRENCY: z.coerce.number().int().min(1).max(256).default(8),
  /**
   * Jobs one worker process holds ahead of its WORKER_CONCURRENCY slots: fetched from the queue (BullMQ's
   * concurrency is the sum), their records read, waiting for a slot, so that a finished upload's slot is taken
   * at once rather than after BullMQ's complete-and-fetch. They have not started their attempt (a first attempt
   * can still be canceled), and a worker that shuts down puts them back in the queue. 0 = none.
   */
  WORKER_PREFETCH: z.coerce.number().int().min(0).max(256).default(DEFAULT_WORKER_PREFETCH),
  /**
   * How long a worker's lock on a running job lasts, ms; the worker renews it every half of that. A job
   * whose worker died is taken up again within about WORKER_LOCK_DURATION_MS + WORKER_STALLED_INTERVAL_MS,
   * and resumes from its checkpoints.
   */
  WORKER_LOCK_DURATION_MS: z.coerce.number().int().min(1000).max(600_000).default(30_000),
  /** How often workers look for running jobs whose lock has expired (stalled), ms; keep it ≤ the lock duration. */
  WORKER_STALLED_INTERVAL_MS: z.coerce.number().int().min(500).max(600_000).default(15_000),
  /**
   * On SIGTERM a worker stops taking jobs and waits this long (ms) for its active jobs; then it exits anyway,
   * and those jobs are taken up again from their checkpoints once their locks expire.
   */
  WORKER_SHUTDOWN_GRACE_MS: z.coerce.number().int().min(0).max(3_600_000).default(30_000),
  /** Times a job may be taken up again after its worker died; one more and it fails with `worker_lost`. */
  WORKER_MAX_STALLED_COUNT: z.coerce.number().int().min(0).max(100).default(2),
  /** Attempts per upload job (first try included) for retryable failures. */
  JOB_ATTEMPTS: z.coerce.number().int().min(1).max(100).default(8),
  /** Base delay of the exponential backoff between attempts, ms (jittered). */
  JOB_BACKOFF_MS: z.coerce.number().int().min(0).max(600_000).default(1000),
  /** Upper bound of the delay between attempts, ms (before jitter). */
  JOB_BACKOFF_MAX_MS: z.coerce.number().int().min(0).max(3_600_000).default(300_000),
  /** Timeout of one AWS KMS call, ms. */
  KMS_TIMEOUT_MS: z.coerce.number().int().min(100).max(300_000).default(15_000),
  /**
   * AWS KMS request quotas, per AWS account and region, that the workers keep to together: `Op=rate` pairs
   * (requests per second) replacing AWS's defaults (shared/kms-quotas.ts), e.g. `GetParametersForImport=2`.
   * A KMS connection's own `quotas` override these for its account.
   */
  KMS_QUOTAS: kmsQuotaListSchema.prefault(''),
  /**
   * A KMS call whose quota frees up within this many ms waits in place; a longer wait puts its job back in
   * the queue (delayed, no attempt counted) until then, freeing the worker for other accounts' jobs.
   */
  KMS_QUOTA_MAX_SLEEP_MS: z.coerce.number().int().min(0).max(60_000).default(250),
  /** Wrapping key spec asked of AWS when a connection does not say. */
  DEFAULT_WRAPPING_KEY_SPEC: z.enum(['RSA_2048', 'RSA_3072', 'RSA_4096']).default('RSA_4096'),
  /** Allow KMS connection endpoints on http:// (emulators); production endpoints are https. */
  ALLOW_HTTP_KMS_ENDPOINT: boolFromEnv.default(false),
  /**
   * Hosts (and ports) a KMS connection's `endpoint` may name: comma-separated patterns (HOST_PATTERN_RE in
   * shared/kms-endpoints.ts, at most one `<region>` each). Default: AWS KMS's own endpoints. The API refuses
   * another endpoint, and workers refuse a connection whose endpoint is no longer allowed before any KMS request.
   * A host that only patterns with `<region>` match serves that region alone (kmsEndpointProblem).
   */
  KMS_ENDPOINT_HOSTS: z
    .string()
    .default(AWS_KMS_ENDPOINT_HOSTS.join(','))
    .transform((v) => v.split(',').map((p) => p.trim().toLowerCase()))
    .refine((ps) => ps.every(validHostPattern), 'comma-separated host patterns (labels, * or at most one <region>, then optionally :PORT or :*; e.g. kms.<region>.amazonaws.com)'),
  /** Webhooks: allow http:// callback URLs (https only by default). */
  WEBHOOK_ALLOW_HTTP: boolFromEnv.default(false),
  /** Webhooks: comma-separated CIDRs that may be called although private/loopback/special (e.g. 127.0.0.1/32). */
  WEBHOOK_ALLOW_CIDRS: z.string().default('').refine(validCidrs, 'comma-separated CIDRs or addresses, e.g. 127.0.0.1/32'),
  /** Webhooks: timeout of one delivery attempt, ms. */
  WEBHOOK_TIMEOUT_MS: z.coerce.number().int().min(100).max(60_000).default(10_000),
  /** Webhooks: delays before each retry, seconds, comma-separated (default: about a day in all). */
  WEBHOOK_RETRY_SCHEDULE: z
    .string()
    .regex(/^\d+(\.\d+)?(,\d+(\.\d+)?)*$/, 'comma-separated seconds, e.g. 5,300,1800')
    .default('5,300,1800,7200,18000,36000,36000'),
  /** Webhooks: how long the previous secret keeps signing after a rotation, seconds. */
  WEBHOOK_SECRET_GRACE_SECONDS: z.coerce.number().int().min(0).max(30 * 86_400).default(86_400),
  /** Webhooks: deliveries one worker process makes at once. */
  WEBHOOK_CONCURRENCY: z.coerce.number().int().min(1).max(256).default(16),
  /**
   * PKCS#11 libraries an HSM connection may name (comma-separated absolute paths). Workers load the library
   * a connection names, so only the operator decides which; empty: no HSM connection can be registered.
   */
  HSM_LIBRARIES: z
    .string()
    .default('')
    .refine((v) => v === '' || v.split(',').every((p) => p.trim().startsWith('/')), 'comma-separated absolute paths')
    .transform((v) => (v === '' ? [] : v.split(',').map((p) => p.trim()))),
  /**
   * Which HSM tokens each account may use: comma-separated `ACCOUNT:label=LABEL` or `ACCOUNT:slot=N` entries,
   * ACCOUNT `*` meaning any account (single-tenant deployments). The API refuses a connection to any other
   * token and workers check again before any PKCS#11 call; empty: no HSM connection can be registered.
   */
  HSM_TOKENS: hsmTokenListSchema.prefault(''),
  /** DSM (KMIP) servers: comma-separated CIDRs that may be connected to although private/loopback (e.g. 10.0.0.0/8). */
  DSM_ALLOW_CIDRS: z.string().default('').refine(validCidrs, 'comma-separated CIDRs or addresses, e.g. 10.0.0.0/8,127.0.0.1'),
  /**
   * DSM (KMIP) servers: the ports a connection may name, comma-separated ports or ranges (`5696,9000-9100`).
   * The API refuses other ports and workers check again; parsed into inclusive ranges.
   */
  DSM_ALLOWED_PORTS: z
    .string()
    .default('5696')
    .transform((v, ctx) => {
      const ranges: { from: number; to: number }[] = [];
      for (const entry of v.split(',').map((e) => e.trim())) {
        const m = /^(\d{1,5})(?:-(\d{1,5}))?$/.exec(entry);
        const from = Number(m?.[1]);
        const to = m?.[2] === undefined ? from : Number(m[2]);
        if (!m || from < 1 || to > 65_535 || from > to) {
          ctx.addIssue({ code: 'custom', message: `"${entry}" is not a port or range: comma-separated ports or ranges within 1-65535, e.g. 5696,9000-9100` });
          return z.NEVER;
        }
        ranges.push({ from, to });
      }
      return ranges;
    }),
  /** Bound on connecting to a KMIP server (DNS, TCP and TLS handshake together) and, separately, on each KMIP answer, ms. */
  KMIP_TIMEOUT_MS: z.coerce.number().int().min(100).max(120_000).default(10_000),
  /** Job and batch records (and their event streams) are deleted this many days after they end. */
  RECORD_RETENTION_DAYS: z.coerce.number().positive().max(3650).default(30),
  /** Previous master keys (comma-separated, 64 hex or base64 each) that still open values sealed before a rotation. */
  KEYFERRY_MASTER_KEY_PREVIOUS: z
    .string()
    .default('')
    .refine((v) => v === '' || v.split(',').every((k) => decodeKey(k.trim()) !== undefined), 'comma-separated 32-byte keys (64 hex or base64)')
    .transform((v) => (v === '' ? [] : v.split(',').map((k) => decodeKey(k.trim()) as Buffer))),
  /** Server-Sent Events: a keep-alive comment after this long without events, ms. */
  SSE_KEEPALIVE_MS: z.coerce.number().int().min(100).max(300_000).default(15_000),
  /** Server-Sent Events: streams one account may hold open at once on one API process (each holds a Redis connection). */
  SSE_MAX_STREAMS_PER_ACCOUNT: z.coerce.number().int().min(1).max(100_000).default(100),
  LOG_LEVEL: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info'),
  /**
   * The `cust.groups` group whose tokens open the queue dashboard (/admin/queues). Every tenant's jobs show
   * there: with tokens from an identity provider (JWT_JWKS_URL), pick a group only operators have.
   */
  ADMIN_GROUP: z.string().regex(/^[\x21-\x7e]{1,128}$/, 'a group name (printable characters, no spaces)').default('admin'),
  /**
   * The queue dashboard (/admin/queues) only shows: no retry, clean, pause, add or remove. Its actions act on
   * BullMQ alone, behind keyferry's job records (emptying a queue strands queued records), so they are off
   * unless this is false.
   */
  ADMIN_READ_ONLY: boolFromEnv.default(true),
  /** OTLP/HTTP collector base URL (spans go to `<url>/v1/traces`); tracing is off while unset or empty. */
  OTEL_EXPORTER_OTLP_ENDPOINT: z.preprocess((v) => (v === '' ? undefined : v), z.url({ protocol: /^https?$/, message: 'Must be an http(s) URL.' }).optional()),
  /** service.name of this process's spans (default keyferry-api or keyferry-worker). */
  OTEL_SERVICE_NAME: z.preprocess((v) => (v === '' ? undefined : v), z.string().optional()),
});

export type Config = z.infer<typeof configSchema>;

export function decodeKey(v: string): Buffer | undefined {
  const buf = /^[0-9a-fA-F]{64}$/.test(v) ? Buffer.from(v, 'hex') : Buffer.from(v, 'base64');
  return buf.length === 32 ? buf : undefined;
}

export class ConfigError extends Error {
  override name = 'ConfigError';
}

/** Parses the environment; throws a ConfigError naming every bad variable. */
export function loadConfig(env: NodeJS.ProcessEnv = process.env): Config {
  const parsed = configSchema.safeParse(env);
  if (!parsed.success) {
    const lines = parsed.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`);
    throw new ConfigError(`invalid configuration:\n  ${lines.join('\n  ')}`);
  }
  return parsed.data;
}

/** For entry points: load the config or print why not and exit 1. */
export function loadConfigOrExit(env: NodeJS.ProcessEnv = process.env): Config {
  try {
    return loadConfig(env);
  } catch (err) {
    console.error(err instanceof Error ? err.message : String(err));
    process.exit(1);
  }
}

function validCidrs(list: string): boolean {
  try {
    parseCidrs(list);
    return true;
  } catch {
    return false;
  }
}
