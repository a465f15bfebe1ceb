import { Cluster, Redis } from 'ioredis';
import type { Config } from './config.js';

export type RedisClient = Redis | Cluster;

/**
 * The one factory of Redis connections. `maxRetriesPerRequest: null` is what BullMQ workers need;
 * API-side clients pass `failFast` so a request fails quickly instead of hanging while Redis is away:
 * ioredis fails the commands waiting for the connection at every second failed reconnect, and these
 * reconnects are at most 500 ms apart (its default backs off to 2 s, so commands would wait up to 4 s).
 */
export function createRedis(
  config: Pick<Config, 'REDIS_URL' | 'REDIS_CLUSTER_NODES'>,
  opts: { failFast?: boolean } = {},
): RedisClient {
  const common = opts.failFast
    ? { maxRetriesPerRequest: 1, enableOfflineQueue: true, connectTimeout: 2000, retryStrategy: (times: number) => Math.min(times * 50, 500) }
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
