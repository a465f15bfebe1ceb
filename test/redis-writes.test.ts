/**
 * A client made by createRedis coalesces the commands written in one turn of the event
 * loop into one socket write (shared/redis.ts coalesceWrites), also on the socket of a reconnect. Counted on
 * the real socket to the real Redis: each call of its _write or _writev hands data to the kernel once.
 */
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadConfig } from '../shared/config.js';
import { createRedis } from '../shared/redis.js';
import { deleteKeyspace } from '../shared/stores/keyspace.js';
import { socketWrites } from './helpers/socket-writes.js';
import { testEnv } from './helpers/stack.js';

const config = loadConfig(testEnv('redis-writes'));
const keys = Array.from({ length: 10 }, (_, i) => `${config.KEYFERRY_PREFIX}:k${i}`);
let admin: Redis;

beforeAll(() => {
  admin = new Redis(config.REDIS_URL);
});

afterAll(async () => {
  await deleteKeyspace(admin, config.KEYFERRY_PREFIX);
  admin.disconnect();
});

/** Ten SETs in one turn, then ten GETs in one turn; the GETs must answer each SET's own value. */
async function tenAndTen(client: Redis, tag: string): Promise<{ setWrites: number; getWrites: number }> {
  const setWrites = await socketWrites([client], () => Promise.all(keys.map((k, i) => client.set(k, `${tag}-${i}`))));
  let values: (string | null)[] = [];
  const getWrites = await socketWrites([client], async () => {
    values = await Promise.all(keys.map((k) => client.get(k)));
  });
  expect(values).toEqual(keys.map((_, i) => `${tag}-${i}`));
  return { setWrites, getWrites };
}

describe('Redis write coalescing', () => {
  it.each([
    ['an API client (fail-fast)', { failFast: true }, 'a'],
    ['a worker client', {}, 'w'],
  ] as const)('when %s sends ten commands in one turn, then they leave in one socket write and each gets its own answer', async (_what, opts, tag) => {
    const client = createRedis(config, opts) as Redis;
    try {
      await client.ping();
      expect(await tenAndTen(client, tag)).toEqual({ setWrites: 1, getWrites: 1 });
    } finally {
      client.disconnect();
    }
  });

  it('when a createRedis client reconnects, then the new socket coalesces too', async () => {
    const client = createRedis(config, { failFast: true }) as Redis;
    try {
      await client.ping();
      const first = client.stream;
      const ready = new Promise((resolve) => client.once('ready', resolve));
      client.disconnect(true);
      await ready;
      expect(client.stream).not.toBe(first);
      expect(await tenAndTen(client, 'b')).toEqual({ setWrites: 1, getWrites: 1 });
    } finally {
      client.disconnect();
    }
  });

  it('when the connection drops while commands are corked, then ioredis sends them again after reconnecting and each is applied', async () => {
    const client = createRedis(config) as Redis;
    try {
      await client.ping();
      const first = client.stream;
      const sets = keys.map((k, i) => client.set(k, `d-${i}`));
      first.destroy(); // same turn: the ten SETs are still corked in this socket
      await Promise.all(sets);
      expect(client.stream).not.toBe(first);
      expect(await admin.mget(...keys)).toEqual(keys.map((_, i) => `d-${i}`));
    } finally {
      client.disconnect();
    }
  });

  it('when a plain ioredis client sends ten commands in one turn, then each leaves in a write of its own (what the coalescing saves)', async () => {
    const client = new Redis(config.REDIS_URL);
    try {
      await client.ping();
      const { setWrites, getWrites } = await tenAndTen(client, 'c');
      expect(Math.min(setWrites, getWrites)).toBeGreaterThan(1);
    } finally {
      client.disconnect();
    }
  });
});
