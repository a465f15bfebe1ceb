import type { Redis } from 'ioredis';
import { Keyspace } from '../../shared/stores/keyspace.js';

/** Every key under a prefix, BullMQ's included. */
export async function keysUnder(redis: Redis, prefix: string): Promise<string[]> {
  const out: string[] = [];
  for (const pattern of new Keyspace(prefix).patterns) {
    let cursor = '0';
    do {
      const [next, keys] = await redis.scan(cursor, 'MATCH', pattern, 'COUNT', 1000);
      cursor = next;
      out.push(...keys);
    } while (cursor !== '0');
  }
  return out;
}

/** Every value stored in `keys`, as text, whatever the Redis type. */
export async function valuesOf(redis: Redis, keys: string[]): Promise<string[]> {
  const out: string[] = [];
  for (const key of keys) {
    const type = await redis.type(key);
    if (type === 'string') out.push((await redis.getBuffer(key))?.toString('latin1') ?? '');
    else if (type === 'hash') out.push(...Object.entries(await redis.hgetall(key)).flat());
    else if (type === 'list') out.push(...(await redis.lrange(key, 0, -1)));
    else if (type === 'set') out.push(...(await redis.smembers(key)));
    else if (type === 'zset') out.push(...(await redis.zrange(key, 0, -1)));
    else if (type === 'stream') out.push(...(await redis.xrange(key, '-', '+')).map((e) => JSON.stringify(e)));
  }
  return out;
}

/** Every value stored under a prefix (for leak scans). */
export async function redisValuesUnder(redis: Redis, prefix: string): Promise<string[]> {
  return valuesOf(redis, await keysUnder(redis, prefix));
}

/** The intake rate limit's bucket, which every intake request writes, accepted or not. */
export const isRateLimitBucket = (key: string) => key.endsWith(':ratelimit');
