/**
 * The API on a Redis Cluster of its own (three masters) that goes away: requests answer 503 at once, as on a
 * standalone Redis, instead of waiting in ioredis's Cluster offline queue for as long as the cluster is away.
 */
import { randomUUID } from 'node:crypto';
import { Redis } from 'ioredis';
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

const getJob = async (id: string = randomUUID()) => {
  const started = Date.now();
  const res = await fetch(`${api.url}/api/v1/jobs/${id}`, { headers: { authorization: `Bearer ${token}` }, signal: AbortSignal.timeout(10_000) });
  return { status: res.status, retryAfter: res.headers.get('retry-after'), ms: Date.now() - started };
};

/** Polls until the API answers 404 for a job that does not exist: the cluster serves it. */
const untilServed = async (id?: string) => {
  for (let i = 0; (await getJob(id)).status !== 404; i++) {
    if (i > 100) throw new Error('the API never answered 404 on the running cluster');
    await new Promise((r) => setTimeout(r, 100));
  }
};

describe('the API on a Redis Cluster that goes away', () => {
  it('when the slot of the key asked for has no node (CLUSTERDOWN), then 503 with Retry-After, and the answer comes back with the slot', async () => {
    await untilServed();
    const id = randomUUID();
    const prefix = config().KEYFERRY_PREFIX;
    const node = new Redis(cluster.ports[0] as number, '127.0.0.1');
    try {
      const slot = Number(await node.call('CLUSTER', 'KEYSLOT', `${prefix}:job:{${id}}`));
      const slots = (await node.call('CLUSTER', 'SLOTS')) as [number, number, [string, number]][];
      const owner = slots.find(([from, to]) => slot >= from && slot <= to)?.[2][1] as number;
      const ownerNode = new Redis(owner, '127.0.0.1');
      try {
        await ownerNode.call('CLUSTER', 'DELSLOTS', String(slot));
        for (let i = 0; i < 2; i++) {
          const down = await getJob(id);
          expect(down).toMatchObject({ status: 503, retryAfter: expect.any(String) });
          expect(down.ms).toBeLessThan(8000);
        }
      } finally {
        await ownerNode.call('CLUSTER', 'ADDSLOTS', String(slot)).catch(() => undefined);
        ownerNode.disconnect();
      }
      await untilServed(id);
    } finally {
      node.disconnect();
    }
  }, 40_000);

  it('when every node of the cluster is gone, then requests answer 503 with Retry-After at once, not when the cluster is back', async () => {
    await untilServed(); // up: the cluster answers (no such job)
    await cluster.stop();
    for (let i = 0; i < 3; i++) {
      const down = await getJob();
      expect(down).toMatchObject({ status: 503, retryAfter: expect.any(String) });
      expect(down.ms).toBeLessThan(5000); // a bound far from the hang it replaces (as long as the cluster is away)
    }
  }, 30_000);
});
