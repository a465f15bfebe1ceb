import { Cluster, Redis } from 'ioredis';
import type { Config } from './config.js';

export type RedisClient = Redis | Cluster;

/**
 * The one factory of Redis connections. `maxRetriesPerRequest: null` is what BullMQ workers need;
 * API-side clients pass `failFast` so a request fails quickly instead of hanging while Redis is away.
 */
export function createRedis(
  config: Pick<Config, 'REDIS_URL' | 'REDIS_CLUSTER_NODES'>,
  opts: { failFast?: boolean } = {},
): RedisClient {
  const common = opts.failFast
    ? { maxRetriesPerRequest: 1, enableOfflineQueue: true, connectTimeout: 2000 }
    : { maxRetriesPerRequest: null };
  if (config.REDIS_CLUSTER_NODES) {
    const nodes = config.REDIS_CLUSTER_NODES.split(',').map((hp) => {
      const [host, port] = hp.trim().split(':');
      return { host: host ?? '127.0.0.1', port: Number(port ?? 6379) };
    });
    return new Cluster(nodes, { redisOptions: common });
  }
  return new Redis(config.REDIS_URL, common);
}
