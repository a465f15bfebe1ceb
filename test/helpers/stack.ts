import { randomBytes } from 'node:crypto';
import { Writable } from 'node:stream';
import { Redis } from 'ioredis';
import { startApi, type ApiServer } from '../../api/server.js';
import { signToken } from '../../shared/auth.js';
import { loadConfig, type Config } from '../../shared/config.js';
import { DEFAULT_KMS_QUOTAS } from '../../shared/kms-quotas.js';
import { createLogger } from '../../shared/logger.js';
import { createRedis } from '../../shared/redis.js';
import { deleteKeyspace } from '../../shared/stores/keyspace.js';
import { startWorker, type WorkerHandle } from '../../worker/runner.js';
import { KmsEmulator, type KmsEmulatorOptions } from '../kms-emulator/emulator.js';
import { redisValuesUnder } from './redis-dump.js';

export const TEST_REDIS_URL = process.env.TEST_REDIS_URL ?? 'redis://127.0.0.1:6379';
export const EMULATOR_ACCESS_KEY = 'AKIAKEYFERRYTEST0001';
export const EMULATOR_SECRET_KEY = 'emulator-secret-access-key-0001';

/** Lines the stack logged, to assert that no secret or key material was ever written. */
export class LogSink extends Writable {
  readonly lines: string[] = [];
  override _write(chunk: Buffer, _enc: BufferEncoding, cb: () => void): void {
    this.lines.push(...chunk.toString('utf8').split('\n').filter(Boolean));
    cb();
  }
}

export interface StackOptions {
  /** Names the Redis prefix (one per test file), so files never see each other's keys. */
  name: string;
  worker?: boolean;
  env?: Record<string, string>;
  emulator?: KmsEmulatorOptions;
}

export interface TestStack {
  config: Config;
  api: ApiServer;
  worker: WorkerHandle | undefined;
  emulator: KmsEmulator;
  redis: Redis;
  logs: LogSink;
  token(account?: string, opts?: { ttlSeconds?: number; secret?: string }): Promise<string>;
  call(method: string, path: string, opts?: { body?: unknown; token?: string; headers?: Record<string, string>; raw?: string }): Promise<{ status: number; headers: Headers; body: any }>;
  startWorker(env?: Record<string, string>): Promise<WorkerHandle>;
  /** Environment for another API or worker (in-process or a child) sharing this stack's data and tokens. */
  childEnv(env?: Record<string, string>): Record<string, string>;
  /** Registers secrets (key material, AWS secret keys) that must never show up in Redis or the logs. */
  watchForLeaks(...secrets: (string | Buffer)[]): void;
  /** Stops everything; first fails if any watched secret is in a Redis value or a log line of this stack. */
  close(): Promise<void>;
}

/** The forms a secret could leak in: as given, and key material as hex and base64. */
function leakForms(secret: string | Buffer): string[] {
  return typeof secret === 'string' ? [secret] : [secret.toString('hex'), secret.toString('base64'), secret.toString('base64url')];
}

export function testEnv(name: string, env: Record<string, string> = {}): Record<string, string> {
  return {
    REDIS_URL: TEST_REDIS_URL,
    KEYFERRY_PREFIX: `kft-${name}-${randomBytes(4).toString('hex')}`,
    KEYFERRY_MASTER_KEY: randomBytes(32).toString('hex'),
    JWT_SECRET: randomBytes(32).toString('hex'),
    PORT: '0',
    WORKER_METRICS_PORT: '0',
    HOST: '127.0.0.1',
    ALLOW_HTTP_KMS_ENDPOINT: 'true',
    KMS_ENDPOINT_HOSTS: '127.0.0.1:*', // the emulator's
    DEFAULT_WRAPPING_KEY_SPEC: 'RSA_2048',
    JOB_BACKOFF_MS: '50',
    JOB_ATTEMPTS: '5',
    WORKER_CONCURRENCY: '4',
    KMS_TIMEOUT_MS: '5000',
    // AWS's quotas × 100: the emulator enforces none unless a test sets them, and AWS's own would hold every
    // upload a second for GetParametersForImport (test/quotas.test.ts tests them).
    KMS_QUOTAS: Object.entries(DEFAULT_KMS_QUOTAS).map(([op, rps]) => `${op}=${rps * 100}`).join(','),
    LOG_LEVEL: 'debug',
    ...env,
  };
}

/** API (+ worker) + KMS emulator against real Redis, with its own prefix. */
export async function startStack(opts: StackOptions): Promise<TestStack> {
  const config = loadConfig(testEnv(opts.name, opts.env));
  const logs = new LogSink();
  const logger = createLogger(config.LOG_LEVEL, 'keyferry-test', logs);
  const emulator = new KmsEmulator({ accounts: { [EMULATOR_ACCESS_KEY]: '123456789012' }, ...opts.emulator });
  await emulator.start();
  const api = await startApi(config, logger);
  const workers: WorkerHandle[] = [];
  const redis = new Redis(config.REDIS_URL);
  redis.on('error', () => undefined); // tests that stop Redis on purpose expect this client to fail meanwhile
  const watched = new Set<string>();

  const stack: TestStack = {
    config,
    api,
    emulator,
    redis,
    logs,
    worker: undefined,
    token: (account = 'acme', t = {}) =>
      signToken({ secret: t.secret ?? config.JWT_SECRET, account, ...(t.ttlSeconds !== undefined ? { ttlSeconds: t.ttlSeconds } : {}) }),
    async call(method, path, o = {}) {
      const headers: Record<string, string> = { ...o.headers };
      if (o.token !== undefined) headers.authorization = `Bearer ${o.token}`;
      let body: string | undefined = o.raw;
      if (o.body !== undefined) {
        body = JSON.stringify(o.body);
        headers['content-type'] ??= 'application/json';
      }
      const res = await fetch(`${api.url}${path}`, { method, headers, ...(body !== undefined ? { body } : {}) });
      const text = await res.text();
      let parsed: unknown = text;
      try {
        parsed = text ? JSON.parse(text) : undefined;
      } catch {
        /* not JSON: keep the text */
      }
      return { status: res.status, headers: res.headers, body: parsed };
    },
    async startWorker(env = {}) {
      const wconfig = loadConfig(stack.childEnv(env));
      const w = await startWorker(wconfig, logger);
      workers.push(w);
      stack.worker ??= w;
      return w;
    },
    childEnv(env = {}) {
      return {
        ...testEnv(opts.name, opts.env),
        ...env,
        KEYFERRY_PREFIX: config.KEYFERRY_PREFIX,
        KEYFERRY_MASTER_KEY: config.KEYFERRY_MASTER_KEY.toString('hex'),
        JWT_SECRET: config.JWT_SECRET,
      };
    },
    watchForLeaks(...secrets) {
      for (const secret of secrets) for (const form of leakForms(secret)) watched.add(form);
    },
    async close() {
      await Promise.all(workers.map((w) => w.close()));
      await api.close();
      await emulator.close();
      // Where the stack's data is: REDIS_URL, or the Redis Cluster the stack was given.
      const data = config.REDIS_CLUSTER_NODES ? createRedis(config) : redis;
      try {
        const haystacks = [...(await redisValuesUnder(data, config.KEYFERRY_PREFIX)), ...logs.lines];
        const leaks = [...watched].filter((needle) => haystacks.some((h) => h.includes(needle)));
        if (leaks.length > 0) throw new Error(`${leaks.length} watched secret(s) found in Redis values or log lines of ${opts.name}`);
      } finally {
        await deleteKeyspace(data, config.KEYFERRY_PREFIX);
        if (data !== redis) data.disconnect();
        redis.disconnect();
      }
    },
  };
  if (opts.worker !== false) await stack.startWorker();
  return stack;
}

/** Registers the emulator as a KMS connection named `kms` (as the spec's example expects). */
export async function seedKms(stack: TestStack, token: string, overrides: Record<string, unknown> = {}) {
  const res = await stack.call('POST', '/api/v1/cckm/aws/kms', {
    token,
    body: {
      name: 'kms',
      account_id: '123456789012',
      regions: ['ap-south-1', 'us-east-1'],
      aws_access_key_id: EMULATOR_ACCESS_KEY,
      aws_secret_access_key: EMULATOR_SECRET_KEY,
      endpoint: stack.emulator.url,
      ...overrides,
    },
  });
  stack.watchForLeaks(String(overrides.aws_secret_access_key ?? EMULATOR_SECRET_KEY));
  if (res.status !== 201) throw new Error(`seeding kms failed: ${res.status} ${JSON.stringify(res.body)}`);
  return res.body as { id: string; name: string };
}

export async function seedLocalKey(stack: TestStack, token: string, name: string, materialHex?: string) {
  const res = await stack.call('POST', '/api/v1/vault/keys2', {
    token,
    body: { name, algorithm: 'AES', size: 256, ...(materialHex ? { material: materialHex } : {}) },
  });
  if (res.status !== 201) throw new Error(`seeding local key failed: ${res.status} ${JSON.stringify(res.body)}`);
  if (materialHex) stack.watchForLeaks(Buffer.from(materialHex, 'hex'));
  return res.body as { id: string; name: string };
}

/** Polls the job resource until it reaches a final status (tests only; clients may use Prefer: wait). */
export async function waitForJob(stack: TestStack, token: string, id: string, timeoutMs = 20_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const res = await stack.call('GET', `/api/v1/jobs/${id}`, { token });
    if (['succeeded', 'failed', 'canceled'].includes(res.body?.status)) return res.body;
    if (Date.now() > deadline) throw new Error(`job ${id} did not finish: ${JSON.stringify(res.body)}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Polls the batch resource until it is completed. */
export async function waitForBatch(stack: TestStack, token: string, id: string, timeoutMs = 30_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const res = await stack.call('GET', `/api/v1/batches/${id}`, { token }).catch(() => undefined);
    if (res?.body?.status === 'completed') return res.body;
    if (Date.now() > deadline) throw new Error(`batch ${id} did not complete: ${JSON.stringify(res?.body)}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Upload jobs waiting in BullMQ (plain and prioritised), to check that a rejected request enqueued nothing. */
export async function queuedJobs(stack: TestStack): Promise<number> {
  const bull = `{${stack.config.KEYFERRY_PREFIX}}:upload-key`;
  return (await stack.redis.llen(`${bull}:wait`)) + (await stack.redis.zcard(`${bull}:prioritized`));
}
