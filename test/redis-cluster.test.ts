/**
 * keyferry on a Redis Cluster of its own (three masters started by the test, REDIS_CLUSTER_NODES set for the API
 * and the worker): single uploads, `Prefer: wait`, a job's event stream and signed callback, a batch, the write
 * coalescing of each node's connection, and `npm run rekey` (last: it rotates the master key under the running
 * API and worker).
 * Job records, BullMQ's queue and the account's resources hash to different slots, so they live on different
 * nodes; multi-key scripts keep to one slot through hash tags (shared/stores/keyspace.ts).
 */
import { randomBytes } from 'node:crypto';
import { Cluster, type Redis } from 'ioredis';
import { Webhook } from 'standardwebhooks';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createStores } from '../shared/context.js';
import { createRedis } from '../shared/redis.js';
import { localKeyContext } from '../shared/resources.js';
import { Keyspace } from '../shared/stores/keyspace.js';
import { runEntry } from './helpers/child.js';
import { Receiver } from './helpers/receiver.js';
import { keysUnder } from './helpers/redis-dump.js';
import { OwnRedisCluster } from './helpers/redis-server.js';
import { socketWrites } from './helpers/socket-writes.js';
import { collectEvents } from './helpers/sse.js';
import { seedKms, seedLocalKey, startStack, testEnv, waitForBatch, waitForJob, type TestStack } from './helpers/stack.js';

let cluster: OwnRedisCluster;
let stack: TestStack;
let token: string;
/** A client of the test's own to the cluster, to look at what keyferry wrote. */
let admin: Cluster;
const receiver = new Receiver();
const item = (alias: string) => ({ source_key_identifier: 'test-key', region: 'us-east-1', kms: 'kms', aws_param: { Alias: alias } });

beforeAll(async () => {
  cluster = await OwnRedisCluster.start();
  await receiver.start();
  const env = { REDIS_CLUSTER_NODES: cluster.nodes, WEBHOOK_ALLOW_HTTP: 'true', WEBHOOK_ALLOW_CIDRS: '127.0.0.0/8,::1/128' };
  stack = await startStack({ name: 'cluster', worker: false, env });
  token = await stack.token('acme');
  await seedKms(stack, token);
  await seedLocalKey(stack, token, 'test-key');
  await stack.startWorker(env);
  admin = new Cluster(cluster.startupNodes);
}, 60_000);

afterAll(async () => {
  admin?.disconnect();
  try {
    await stack?.close();
  } finally {
    await cluster?.stop();
    await receiver.close();
  }
});

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
    const stored = await keysUnder(admin, stack.config.KEYFERRY_PREFIX);
    expect(stored).toEqual(expect.arrayContaining([keys.job(id), keys.uploadedKey(String(job.result?.id)), `${keys.bullPrefix}:upload-key:meta`]));
    expect(await keysUnder(stack.redis, stack.config.KEYFERRY_PREFIX)).toEqual([]);
  });

  it('when an upload asks to wait (Prefer: wait), then the answer is the finished key', async () => {
    const res = await stack.call('POST', '/api/v1/cckm/aws/upload-key', { token, body: item('cluster-wait'), headers: { prefer: 'wait=15' } });
    expect(res.status).toBe(201);
    expect(res.headers.get('preference-applied')).toBe('wait=15');
    expect(res.body).toMatchObject({ aws_param: { Origin: 'EXTERNAL' } });
  });

  it("when an upload with a callback_url runs, then its event stream shows it succeed and the signed callback arrives", async () => {
    const secret = (await stack.call('POST', '/api/v1/webhooks/secret', { token })).body.secret as string;
    const res = await stack.call('POST', '/api/v1/cckm/aws/upload-key', { token, body: { ...item('cluster-events'), callback_url: receiver.url('/cluster') } });
    expect(res.status).toBe(202);
    const events = await collectEvents(`${stack.api.url}/api/v1/jobs/${String(res.body.id)}/events`, token, {
      names: ['job'],
      until: (e) => ['succeeded', 'failed', 'canceled'].includes((JSON.parse(e.data) as { status: string }).status),
    });
    expect(JSON.parse(events.at(-1)?.data ?? '{}')).toMatchObject({ status: 'succeeded', step: 'record' });
    for (let i = 0; i < 200 && receiver.at('/cluster').length === 0; i++) await new Promise((r) => setTimeout(r, 25));
    const [delivered] = receiver.at('/cluster');
    expect(delivered).toBeDefined();
    const event = new Webhook(secret).verify(delivered?.body ?? '', delivered?.headers ?? {}) as { type: string; data: { id: string } };
    expect(event).toMatchObject({ type: 'upload-key.succeeded', data: { id: res.body.id } });
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
    // Nodes not connected yet are left out: the warm-up SET connected the one that owns the slot.
    const connected = client.nodes('master').filter((node: Redis) => node.status === 'ready');
    const writes = await socketWrites(connected, () => Promise.all(slotKeys.map((k, i) => client.set(k, String(i)))));
    expect(await client.get(slotKeys[9] as string)).toBe('9');
    return writes;
  }

  it("when ten commands for one node are sent in one turn, then createRedis's cluster client writes them once, a plain one ten times", async () => {
    const coalescing = createRedis({ REDIS_URL: 'redis://unused', REDIS_CLUSTER_NODES: cluster.nodes }) as Cluster;
    const plain = new Cluster(cluster.startupNodes);
    try {
      expect(await writesForTenSets(coalescing)).toBe(1);
      expect(await writesForTenSets(plain)).toBe(10);
    } finally {
      coalescing.disconnect();
      plain.disconnect();
    }
  });
});

describe('master key rotation on a Redis Cluster', () => {
  it('when the re-encryption command runs against the cluster, then the secrets of accounts on every master open with the new key alone', async () => {
    const keys = new Keyspace(stack.config.KEYFERRY_PREFIX);
    // One account per master: an account's resources share its hash tag, so they live on one node.
    const byNode = new Map<string, string>();
    for (const account of ['acme', 'globex', 'initech', 'umbrella', 'hooli', 'stark', 'wayne', 'tyrell', 'cyberdyne', 'soylent']) {
      const slot = Number(await admin.call('CLUSTER', 'KEYSLOT', keys.resources(account, 'localkeys')));
      const node = admin.slots[slot]?.[0];
      if (node && !byNode.has(node)) byNode.set(node, account);
    }
    const accounts = [...byNode.values()];
    expect(accounts).toHaveLength(3);
    const material = new Map(accounts.map((a) => [a, randomBytes(32)]));
    for (const account of accounts) await seedLocalKey(stack, await stack.token(account), 'rekey-key', material.get(account)?.toString('hex'));

    const newKey = randomBytes(32);
    const child = runEntry('shared/rekey-main.ts', {
      ...testEnv('cluster'),
      KEYFERRY_PREFIX: stack.config.KEYFERRY_PREFIX,
      REDIS_CLUSTER_NODES: cluster.nodes,
      KEYFERRY_MASTER_KEY: newKey.toString('hex'),
      KEYFERRY_MASTER_KEY_PREVIOUS: stack.config.KEYFERRY_MASTER_KEY.toString('hex'),
    });
    expect(await child.exited).toEqual({ code: 0, signal: null });
    // acme's KMS connection and its test-key from beforeAll, and one rekey-key per account.
    const resealed = JSON.parse(child.output.find((l) => l.includes('resealed')) ?? '{}') as { resealed: Record<string, number> };
    expect(resealed.resealed).toMatchObject({ kms_connections: 1, local_keys: accounts.length + 1 });

    const newOnly = createStores({ KEYFERRY_PREFIX: stack.config.KEYFERRY_PREFIX, RECORD_RETENTION_DAYS: 30, KEYFERRY_MASTER_KEY: newKey, KEYFERRY_MASTER_KEY_PREVIOUS: [] }, admin);
    for (const account of accounts) {
      const key = await newOnly.localKeys.get(account, 'rekey-key');
      expect(newOnly.box.open(key.material_sealed, localKeyContext(account, key.id))).toEqual(material.get(account));
    }
  });
});
