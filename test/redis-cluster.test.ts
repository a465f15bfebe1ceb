/**
 * keyferry on a Redis Cluster of its own (three masters started by the test, REDIS_CLUSTER_NODES set for the API
 * and the worker): single uploads, `Prefer: wait`, a batch, and the write coalescing of each node's connection.
 * Job records, BullMQ's queue and the account's resources hash to different slots, so they live on different
 * nodes; multi-key scripts keep to one slot through hash tags (shared/stores/keyspace.ts).
 */
import type { Socket } from 'node:net';
import { Cluster, type Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createRedis } from '../shared/redis.js';
import { Keyspace } from '../shared/stores/keyspace.js';
import { keysUnder } from './helpers/redis-dump.js';
import { OwnRedisCluster } from './helpers/redis-server.js';
import { seedKms, seedLocalKey, startStack, waitForBatch, waitForJob, type TestStack } from './helpers/stack.js';

let cluster: OwnRedisCluster;
let stack: TestStack;
let token: string;
/** A client of the test's own to the cluster, to look at what keyferry wrote. */
let admin: Cluster;
const item = (alias: string) => ({ source_key_identifier: 'test-key', region: 'us-east-1', kms: 'kms', aws_param: { Alias: alias } });

beforeAll(async () => {
  cluster = await OwnRedisCluster.start();
  const env = { REDIS_CLUSTER_NODES: cluster.nodes };
  stack = await startStack({ name: 'cluster', worker: false, env });
  token = await stack.token('acme');
  await seedKms(stack, token);
  await seedLocalKey(stack, token, 'test-key');
  await stack.startWorker(env);
  admin = new Cluster(cluster.nodes.split(',').map((hp) => ({ host: '127.0.0.1', port: Number(hp.split(':')[1]) })));
}, 60_000);

afterAll(async () => {
  admin?.disconnect();
  await stack?.close();
  await cluster?.stop();
});

/** Every key on every master of the cluster under this test's prefix. */
async function clusterKeys(): Promise<string[]> {
  const perNode = await Promise.all(admin.nodes('master').map((node) => keysUnder(node, stack.config.KEYFERRY_PREFIX)));
  return perNode.flat();
}

describe('keyferry on a Redis Cluster', () => {
  it('when a key is uploaded, then the job succeeds, and its record, its queue and the key resource are in the cluster, not in REDIS_URL', async () => {
    const res = await stack.call('POST', '/api/v1/cckm/aws/upload-key', { token, body: item('cluster-single') });
    expect(res.status).toBe(202);
    const id = String(res.body.id);
    const job = await waitForJob(stack, token, id);
    expect(job).toMatchObject({ status: 'succeeded', attempts: 1 });
    const key = await stack.call('GET', `/api/v1/cckm/aws/keys/${String(job.result?.id)}`, { token });
    expect(key.status).toBe(200);
    expect(key.body).toMatchObject({ aws_param: { KeyState: 'Enabled', Origin: 'EXTERNAL' } });

    const keys = new Keyspace(stack.config.KEYFERRY_PREFIX);
    const stored = await clusterKeys();
    expect(stored).toEqual(expect.arrayContaining([keys.job(id), keys.uploadedKey(String(job.result?.id)), `${keys.bullPrefix}:upload-key:meta`]));
    expect(await keysUnder(stack.redis, stack.config.KEYFERRY_PREFIX)).toEqual([]);
  });

  it('when an upload asks to wait (Prefer: wait), then the answer is the finished key', async () => {
    const res = await stack.call('POST', '/api/v1/cckm/aws/upload-key', { token, body: item('cluster-wait'), headers: { prefer: 'wait=15' } });
    expect(res.status).toBe(201);
    expect(res.headers.get('preference-applied')).toBe('wait=15');
    expect(res.body).toMatchObject({ aws_param: { Origin: 'EXTERNAL' } });
  });

  it('when a batch of three is uploaded, then it completes with three keys', async () => {
    const res = await stack.call('POST', '/api/v1/cckm/aws/upload-key/batch', { token, body: { items: [item('cluster-b0'), item('cluster-b1'), item('cluster-b2')] } });
    expect(res.status).toBe(202);
    const batch = await waitForBatch(stack, token, String(res.body.id));
    expect(batch).toMatchObject({ status: 'completed', total: 3, counts: { succeeded: 3, failed: 0 } });
  });
});

describe('write coalescing on a Redis Cluster', () => {
  /** Socket writes on every connected master's connection while ten SETs to one slot are sent in one turn. */
  async function writesForTenSets(client: Cluster): Promise<number> {
    const slotKeys = Array.from({ length: 10 }, (_, i) => `${stack.config.KEYFERRY_PREFIX}:{coalesce}:k${i}`);
    await client.set(slotKeys[0] as string, 'warm'); // the slot map is known and the node connected
    let writes = 0;
    // Nodes not connected yet are left out: the warm-up SET connected the one that owns the slot.
    const connected = client.nodes('master').filter((node: Redis) => node.status === 'ready');
    const restore = connected.map((node: Redis) => {
      const socket = node.stream as Socket & { _write: (...a: unknown[]) => void; _writev: (...a: unknown[]) => void };
      const own = { _write: socket._write, _writev: socket._writev };
      socket._write = function (...a: unknown[]) {
        writes++;
        return own._write.apply(this, a);
      };
      socket._writev = function (...a: unknown[]) {
        writes++;
        return own._writev.apply(this, a);
      };
      return () => Object.assign(socket, own);
    });
    try {
      await Promise.all(slotKeys.map((k, i) => client.set(k, String(i))));
    } finally {
      for (const r of restore) r();
    }
    expect(await client.get(slotKeys[9] as string)).toBe('9');
    return writes;
  }

  it("when ten commands for one node are sent in one turn, then createRedis's cluster client writes them once, a plain one ten times", async () => {
    const coalescing = createRedis({ REDIS_URL: 'redis://unused', REDIS_CLUSTER_NODES: cluster.nodes }) as Cluster;
    const plain = new Cluster(cluster.nodes.split(',').map((hp) => ({ host: '127.0.0.1', port: Number(hp.split(':')[1]) })));
    try {
      expect(await writesForTenSets(coalescing)).toBe(1);
      expect(await writesForTenSets(plain)).toBe(10);
    } finally {
      coalescing.disconnect();
      plain.disconnect();
    }
  });
});
