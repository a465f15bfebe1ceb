/**
 * The API's Redis loading its dataset (`LOADING`): a replica loading the RDB of a full resync with its master
 * (or a restart) refuses the commands of clients already connected until it is done. Reads answer 503 with
 * Retry-After, never 500, and answer again once the load is over. Redis's `key-load-delay` (microseconds per key,
 * one of its test settings) makes the load last seconds rather than milliseconds.
 */
import { randomUUID } from 'node:crypto';
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { startApi, type ApiServer } from '../api/server.js';
import { signToken } from '../shared/auth.js';
import { loadConfig } from '../shared/config.js';
import { createLogger } from '../shared/logger.js';
import { OwnRedis } from './helpers/redis-server.js';
import { LogSink, testEnv } from './helpers/stack.js';

/** Keys in the master's dataset, and the load's delay per key (usleep, so often longer): 2 s of loading or more. */
const KEYS = 8_000;
const DELAY_US = 250;

let master: OwnRedis;
let replica: OwnRedis;
let masterClient: Redis;
let replicaClient: Redis;
let api: ApiServer;
let token: string;
const logs = new LogSink();
const loading = async () => /loading:(\d)/.exec(await replicaClient.info('persistence'))?.[1] === '1';

beforeAll(async () => {
  [master, replica] = await Promise.all([OwnRedis.start(), OwnRedis.start()]);
  masterClient = new Redis(master.port, '127.0.0.1');
  replicaClient = new Redis(replica.port, '127.0.0.1');
  replicaClient.on('error', () => undefined);
  await masterClient.config('SET', 'appendonly', 'no');
  await masterClient.config('SET', 'repl-diskless-sync-delay', '0'); // not 5 s waiting for more replicas
  const fill = masterClient.pipeline();
  for (let i = 0; i < KEYS; i++) fill.set(`filler:${i}`, 'x'.repeat(32));
  await fill.exec();
  // The replica loads the resync's RDB from disk, slowly, and serves clients between keys meanwhile.
  await replicaClient.config('SET', 'repl-diskless-load', 'disabled');
  await replicaClient.config('SET', 'key-load-delay', String(DELAY_US));
  await replicaClient.config('SET', 'loading-process-events-interval-bytes', '1024');
  const config = loadConfig(testEnv('loading', { REDIS_URL: replica.url }));
  api = await startApi(config, createLogger('warn', 'keyferry-test', logs));
  token = await signToken({ secret: config.JWT_SECRET, account: 'acme' });
}, 30_000);

afterAll(async () => {
  await Promise.race([api?.close(), new Promise((r) => setTimeout(r, 3000).unref())]);
  masterClient?.disconnect();
  replicaClient?.disconnect();
  await Promise.all([master?.stop(), replica?.stop()]);
});

const getJob = async (id: string) => {
  const res = await fetch(`${api.url}/api/v1/jobs/${id}`, { headers: { authorization: `Bearer ${token}` }, signal: AbortSignal.timeout(10_000) });
  return { status: res.status, retryAfter: res.headers.get('retry-after'), type: res.headers.get('content-type'), body: (await res.json()) as { code?: string } };
};

describe('the API while its Redis loads its dataset', () => {
  it('when a read reaches Redis during the load (LOADING), then 503 problem with Retry-After, logged; once loaded, it answers again', async () => {
    const id = randomUUID();
    expect((await getJob(id)).status).toBe(404);
    await replicaClient.call('REPLICAOF', '127.0.0.1', String(master.port));
    await vi.waitFor(async () => expect(await loading()).toBe(true), { timeout: 10_000, interval: 20 });
    const during = await getJob(id);
    expect(during).toMatchObject({ status: 503, retryAfter: '5', body: { code: 'service_unavailable' } });
    expect(during.type).toMatch(/^application\/problem\+json/);
    expect(logs.lines.some((l) => l.includes('LOADING'))).toBe(true);
    await vi.waitFor(async () => expect(await loading()).toBe(false), { timeout: 20_000, interval: 100 });
    expect((await getJob(id)).status).toBe(404);
  }, 40_000);
});
