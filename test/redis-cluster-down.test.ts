/**
 * The API on a Redis Cluster of its own (three masters) that goes away: requests answer 503 at once, as on a
 * standalone Redis, instead of waiting in ioredis's Cluster offline queue for as long as the cluster is away.
 */
import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { signToken } from '../shared/auth.js';
import { startApi, type ApiServer } from '../api/server.js';
import { loadConfig } from '../shared/config.js';
import { createLogger } from '../shared/logger.js';
import { OwnRedisCluster } from './helpers/redis-server.js';
import { testEnv } from './helpers/stack.js';

let cluster: OwnRedisCluster;
let api: ApiServer;
let token: string;
const config = () => loadConfig(testEnv('cluster-down', { REDIS_CLUSTER_NODES: cluster.nodes }));

beforeAll(async () => {
  cluster = await OwnRedisCluster.start();
  const cfg = config();
  api = await startApi(cfg, createLogger('silent'));
  token = await signToken({ secret: cfg.JWT_SECRET, account: 'acme' });
}, 30_000);

afterAll(async () => {
  // With the cluster gone, closing the API's queues may wait for it: do not wait long.
  await Promise.race([api?.close(), new Promise((r) => setTimeout(r, 3000).unref())]);
  await cluster?.stop();
});

const getJob = async () => {
  const started = Date.now();
  const res = await fetch(`${api.url}/api/v1/jobs/${randomUUID()}`, { headers: { authorization: `Bearer ${token}` }, signal: AbortSignal.timeout(10_000) });
  return { status: res.status, retryAfter: res.headers.get('retry-after'), ms: Date.now() - started };
};

describe('the API on a Redis Cluster that goes away', () => {
  it('when every node of the cluster is gone, then requests answer 503 with Retry-After at once, not when the cluster is back', async () => {
    // Up: the cluster answers (no such job).
    for (let i = 0; (await getJob()).status !== 404; i++) {
      if (i > 50) throw new Error('the API never answered 404 on the running cluster');
      await new Promise((r) => setTimeout(r, 100));
    }
    await cluster.stop();
    for (let i = 0; i < 3; i++) {
      const down = await getJob();
      expect(down).toMatchObject({ status: 503, retryAfter: expect.any(String) });
      expect(down.ms).toBeLessThan(5000); // a bound far from the hang it replaces (as long as the cluster is away)
    }
  }, 30_000);
});
