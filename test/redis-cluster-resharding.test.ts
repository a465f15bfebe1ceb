/**
 * The API on a Redis Cluster of its own while the slot of its queues (the `{prefix}` hash tag) moves to another
 * node, as a resharding moves it: while some of the upload queue's keys are on each node, BullMQ's add script
 * gets TRYAGAIN, which ioredis retries (meeting MOVED from the new node too) and then gives up on: 503 with
 * Retry-After, and nothing enqueued. Once
 * the slot has moved, MOVED sends ioredis to the new node and uploads are accepted again.
 */
import { Cluster, Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { OwnRedisCluster } from './helpers/redis-server.js';
import { seedKms, seedLocalKey, startStack, waitForBatch, type TestStack } from './helpers/stack.js';

let cluster: OwnRedisCluster;
let stack: TestStack;
let token: string;
/** A client of the test's own to the cluster, to count the queue's jobs. */
let admin: Cluster;
const nodes: Redis[] = [];
const upload = (alias: string) => stack.call('POST', '/api/v1/cckm/aws/upload-key', { token, body: { source_key_identifier: 'test-key', region: 'us-east-1', kms: 'kms', aws_param: { Alias: alias } } });

beforeAll(async () => {
  cluster = await OwnRedisCluster.start();
  stack = await startStack({ name: 'cluster-resharding', worker: false, env: { REDIS_CLUSTER_NODES: cluster.nodes } });
  token = await stack.token('acme');
  await seedKms(stack, token);
  await seedLocalKey(stack, token, 'test-key');
  admin = new Cluster(cluster.startupNodes);
  for (const port of cluster.ports) nodes.push(new Redis(port, '127.0.0.1'));
}, 60_000);

afterAll(async () => {
  admin?.disconnect();
  for (const n of nodes) n.disconnect();
  try {
    await stack?.close();
  } finally {
    await cluster?.stop();
  }
});

/** Jobs waiting in the upload queue (single uploads go to `wait`). */
const waiting = async () => {
  const bull = `{${stack.config.KEYFERRY_PREFIX}}:upload-key`;
  return (await admin.llen(`${bull}:wait`)) + (await admin.zcard(`${bull}:prioritized`));
};

/** The queues' slot, the node that owns it and another one, with their cluster ids. */
async function queueSlot() {
  const [first] = nodes as [Redis];
  const slot = Number(await first.call('CLUSTER', 'KEYSLOT', `{${stack.config.KEYFERRY_PREFIX}}`));
  const slots = (await first.call('CLUSTER', 'SLOTS')) as [number, number, [string, number]][];
  const ownerPort = slots.find(([from, to]) => slot >= from && slot <= to)?.[2][1];
  const owner = nodes[cluster.ports.indexOf(ownerPort as number)] as Redis;
  const target = nodes.find((n) => n !== owner) as Redis;
  const id = async (n: Redis) => String(await n.call('CLUSTER', 'MYID'));
  const [ownerId, targetId] = [await id(owner), await id(target)];
  return {
    slot,
    owner,
    /** Marks the slot as moving from its owner to the other node (as redis-cli --cluster reshard does first). */
    begin: async () => {
      await target.call('CLUSTER', 'SETSLOT', String(slot), 'IMPORTING', ownerId);
      await owner.call('CLUSTER', 'SETSLOT', String(slot), 'MIGRATING', targetId);
    },
    keysLeft: async () => (await owner.call('CLUSTER', 'GETKEYSINSLOT', String(slot), '1000')) as string[],
    move: async (keys: string[]) => {
      for (const key of keys) await owner.call('MIGRATE', '127.0.0.1', String(target.options.port), key, '0', '5000');
    },
    /** Every node learns the slot's new owner. */
    finish: async () => {
      for (const n of nodes) await n.call('CLUSTER', 'SETSLOT', String(slot), 'NODE', targetId);
    },
  };
}

describe('the API while a Redis Cluster moves its queue slot', () => {
  it('when the upload queue is split between two nodes (TRYAGAIN), then 503 with Retry-After and nothing enqueued; once the slot has moved (MOVED), uploads are accepted again', async () => {
    expect((await upload('before-1')).status).toBe(202); // the queue's keys exist from here on
    const q = await queueSlot();
    await q.begin();
    const idKey = `{${stack.config.KEYFERRY_PREFIX}}:upload-key:id`;
    expect(await q.keysLeft()).toContain(idKey);
    await q.move([idKey]); // the job id counter moves first; the queue's other keys stay behind

    const refused = await upload('during-1');
    expect(refused).toMatchObject({ status: 503, body: { code: 'service_unavailable' } });
    expect(refused.headers.get('retry-after')).toBe('5');
    // The old owner answered TRYAGAIN (Redis counts its error replies); ioredis, retrying, also met MOVED from
    // the new one, until its redirections ran out. Its last error is in the warning.
    expect(Number(/errorstat_TRYAGAIN:count=(\d+)/.exec(await q.owner.info('errorstats'))?.[1] ?? 0)).toBeGreaterThan(0);
    expect(stack.logs.lines.some((l) => l.includes('redis refused the request for now') && /Too many Cluster redirections.*(TRYAGAIN|MOVED)/.test(l))).toBe(true);

    // The rest of the slot's keys move, then every node learns the slot's new owner.
    await q.move(await q.keysLeft());
    await q.finish();
    expect((await upload('after-1')).status).toBe(202);
    expect(await waiting()).toBe(2);
  }, 60_000);
});

describe('a worker while a Redis Cluster moves its queue slot', () => {
  it('when the slot moves key by key while a batch runs, then every job still succeeds, with one key each', async () => {
    stack.emulator.setLatency(10);
    await stack.startWorker({ WORKER_LOCK_DURATION_MS: '2000', WORKER_STALLED_INTERVAL_MS: '1000', JOB_BACKOFF_MS: '20' });
    const items = Array.from({ length: 30 }, (_, i) => ({ source_key_identifier: 'test-key', region: 'us-east-1', kms: 'kms', aws_param: { Alias: `moving-${i}` } }));
    const res = await stack.call('POST', '/api/v1/cckm/aws/upload-key/batch', { token, body: { items } });
    expect(res.status).toBe(202);
    const batchId = String(res.body.id);
    const succeeded = async () => Number((await stack.call('GET', `/api/v1/batches/${batchId}`, { token })).body.counts?.succeeded ?? 0);
    await vi.waitFor(async () => expect(await succeeded()).toBeGreaterThan(2), { timeout: 20_000, interval: 50 });

    // The queues' slot moves to another node key by key while the worker fetches, runs and completes jobs.
    const q = await queueSlot();
    const redirected = async () => {
      const stats = await q.owner.info('errorstats');
      return ['ASK', 'TRYAGAIN'].reduce((n, e) => n + Number(new RegExp(`errorstat_${e}:count=(\\d+)`).exec(stats)?.[1] ?? 0), 0);
    };
    const redirectedBefore = await redirected();
    await q.begin();
    for (const key of await q.keysLeft()) {
      await q.move([key]);
      await new Promise((r) => setTimeout(r, 20));
    }
    await q.move(await q.keysLeft()); // any the queue made on the old node meanwhile
    await q.finish();
    expect(await succeeded()).toBeLessThan(30); // the move happened while the batch ran
    // The worker's commands met the move: the old node sent them on (ASK) or back (TRYAGAIN).
    expect(await redirected()).toBeGreaterThan(redirectedBefore);

    const batch = await waitForBatch(stack, token, batchId, 60_000);
    expect(batch).toMatchObject({ status: 'completed', counts: { succeeded: 30, failed: 0 } });
    const owners = stack.emulator.keys().map((k) => k.tags.find((t) => t.TagKey === 'keyferry:job-id')?.TagValue);
    for (let i = 0; i < 30; i++) expect(owners.filter((o) => o === `${batchId}.${i}`), `job ${i}`).toHaveLength(1);
  }, 90_000);
});
