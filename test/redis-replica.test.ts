/**
 * The API pointed at a Redis replica of the test's own (a `REDIS_URL` naming a replica, or a failover that left
 * it behind): Redis refuses writes (`READONLY`) and, once the link to its master is down with stale reads off,
 * reads too (`MASTERDOWN`), also inside a MULTI (`EXECABORT`). Each answers 503 with Retry-After, never 500.
 */
import { randomUUID } from 'node:crypto';
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { isRedisRefusing } from '../api/problem.js';
import { startApi, type ApiServer } from '../api/server.js';
import { signToken } from '../shared/auth.js';
import { loadConfig } from '../shared/config.js';
import { createLogger } from '../shared/logger.js';
import { OwnRedis } from './helpers/redis-server.js';
import { LogSink, testEnv } from './helpers/stack.js';

let master: OwnRedis;
let replica: OwnRedis;
let replicaClient: Redis;
let api: ApiServer;
let token: string;
const logs = new LogSink();
const linkStatus = async () => /master_link_status:(\w+)/.exec(await replicaClient.info('replication'))?.[1];

beforeAll(async () => {
  [master, replica] = await Promise.all([OwnRedis.start(), OwnRedis.start()]);
  replicaClient = new Redis(replica.port, '127.0.0.1');
  replicaClient.on('error', () => undefined);
  await replicaClient.config('SET', 'replica-serve-stale-data', 'no');
  await replicaClient.call('REPLICAOF', '127.0.0.1', String(master.port));
  await vi.waitFor(async () => expect(await linkStatus()).toBe('up'), { timeout: 10_000, interval: 100 });
  const config = loadConfig(testEnv('replica', { REDIS_URL: replica.url }));
  api = await startApi(config, createLogger('warn', 'keyferry-test', logs));
  token = await signToken({ secret: config.JWT_SECRET, account: 'acme' });
}, 30_000);

afterAll(async () => {
  await Promise.race([api?.close(), new Promise((r) => setTimeout(r, 3000).unref())]);
  replicaClient?.disconnect();
  await Promise.all([master?.stop(), replica?.stop()]);
});

const call = async (method: string, path: string, body?: unknown) => {
  const res = await fetch(`${api.url}${path}`, {
    method,
    headers: { authorization: `Bearer ${token}`, ...(body ? { 'content-type': 'application/json' } : {}) },
    ...(body ? { body: JSON.stringify(body) } : {}),
    signal: AbortSignal.timeout(10_000),
  });
  return { status: res.status, retryAfter: res.headers.get('retry-after'), type: res.headers.get('content-type'), body: (await res.json()) as { code?: string } };
};

describe('isRedisRefusing', () => {
  const execAbort = (...causes: string[]) =>
    Object.assign(new Error('EXECABORT Transaction discarded because of previous errors.'), { previousErrors: causes.map((c) => new Error(c)) });
  it("when a MULTI was refused, then it passes only if Redis refused each command for now (a command's own error stays a 500)", () => {
    expect(isRedisRefusing(execAbort("READONLY You can't write against a read only replica.", 'MASTERDOWN Link with MASTER is down'))).toBe(true);
    expect(isRedisRefusing(execAbort("READONLY You can't write against a read only replica.", "ERR wrong number of arguments for 'set' command"))).toBe(false);
    expect(isRedisRefusing(execAbort())).toBe(false);
    expect(isRedisRefusing(new Error('OOM command not allowed when used memory > maxmemory.'))).toBe(false);
    expect(isRedisRefusing(new Error('LOADING Redis is loading the dataset in memory'))).toBe(true);
  });
});

describe('the API on a Redis replica', () => {
  it('when it writes (READONLY), then 503 problem with Retry-After, logged; its reads still answer', async () => {
    const upload = await call('POST', '/api/v1/cckm/aws/upload-key', { source_key_identifier: 'k', region: 'us-east-1', kms: 'kms' });
    expect(upload).toMatchObject({ status: 503, retryAfter: '5', body: { code: 'service_unavailable' } });
    expect(upload.type).toMatch(/^application\/problem\+json/);
    expect(logs.lines.some((l) => l.includes('READONLY'))).toBe(true);
    expect((await call('GET', `/api/v1/jobs/${randomUUID()}`)).status).toBe(404);
    expect((await call('GET', `/api/v1/batches/${randomUUID()}`)).status).toBe(404);
  });

  it('when its master is gone and stale reads are off (MASTERDOWN, and EXECABORT for a MULTI), then reads answer 503 too', async () => {
    await master.kill();
    await vi.waitFor(async () => expect(await linkStatus()).toBe('down'), { timeout: 10_000, interval: 100 });
    const job = await call('GET', `/api/v1/jobs/${randomUUID()}`);
    expect(job).toMatchObject({ status: 503, retryAfter: '5' });
    expect(logs.lines.some((l) => l.includes('MASTERDOWN'))).toBe(true);
    // A batch is read with a MULTI: Redis refuses each command and then the EXEC (EXECABORT).
    const batch = await call('GET', `/api/v1/batches/${randomUUID()}`);
    expect(batch).toMatchObject({ status: 503, retryAfter: '5' });
    expect(logs.lines.some((l) => l.includes('EXECABORT'))).toBe(true);
  });
});
