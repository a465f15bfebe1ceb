import type { Redis } from 'ioredis';
import { Keyspace } from '../../shared/stores/keyspace.js';

/** Every value stored under a prefix, as text, whatever the Redis type (for leak scans). */
export async function redisValuesUnder(redis: Redis, prefix: string): Promise<string[]> {
  const out: string[] = [];
  for (const pattern of new Keyspace(prefix).patterns) {
    let cursor = '0';
    do {
      const [next, keys] = await redis.scan(cursor, 'MATCH', pattern, 'COUNT', 1000);
      cursor = next;
      for (const key of keys) {
        const type = await redis.type(key);
        if (type === 'string') out.push((await redis.getBuffer(key))?.toString('latin1') ?? '');
        else if (type === 'hash') out.push(...Object.entries(await redis.hgetall(key)).flat());
        else if (type === 'list') out.push(...(await redis.lrange(key, 0, -1)));
        else if (type === 'set') out.push(...(await redis.smembers(key)));
        else if (type === 'zset') out.push(...(await redis.zrange(key, 0, -1)));
        else if (type === 'stream') out.push(...(await redis.xrange(key, '-', '+')).map((e) => JSON.stringify(e)));
      }
    } while (cursor !== '0');
  }
  return out;
}
