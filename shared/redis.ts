import type { Writable } from 'node:stream';
import { Cluster, Redis } from 'ioredis';
import type { Config } from './config.js';

export type RedisClient = Redis | Cluster;

/**
 * The one factory of Redis connections. `maxRetriesPerRequest: null` is what BullMQ workers need;
 * API-side clients pass `failFast` so a request fails quickly instead of hanging while Redis is away:
 * ioredis fails the commands waiting for the connection at every second failed reconnect, and these
 * reconnects are at most 500 ms apart (its default backs off to 2 s, so commands would wait up to 4 s).
 * `lazyConnect`: the client connects on its first command (or connect()); a copy BullMQ makes of it does too.
 */
export function createRedis(
  config: Pick<Config, 'REDIS_URL' | 'REDIS_CLUSTER_NODES'>,
  opts: { failFast?: boolean; lazyConnect?: boolean } = {},
): RedisClient {
  const common = {
    ...(opts.failFast
      ? { maxRetriesPerRequest: 1, enableOfflineQueue: true, connectTimeout: 2000, retryStrategy: (times: number) => Math.min(times * 50, 500) }
      : { maxRetriesPerRequest: null }),
    ...(opts.lazyConnect ? { lazyConnect: true } : {}),
  };
  if (config.REDIS_CLUSTER_NODES) {
    const nodes = config.REDIS_CLUSTER_NODES.split(',').map((hp) => {
      const [host, port] = hp.trim().split(':');
      return { host: host ?? '127.0.0.1', port: Number(port ?? 6379) };
    });
    const cluster = new Cluster(nodes, { redisOptions: common });
    if (opts.failFast) {
      // ioredis's Cluster keeps commands in its offline queue while it reconnects, for as long as that takes, so
      // an API request would wait as long as the cluster is away. Once it has been ready, commands sent while it
      // is not fail at once instead (`503`); those sent before it first was still wait for it.
      cluster.once('ready', () => {
        cluster.options.enableOfflineQueue = false;
      });
    }
    // Each node's connection coalesces its own writes.
    cluster.on('+node', (node: Redis) => coalesceWrites(node));
    return cluster;
  }
  const client = new Redis(config.REDIS_URL, common);
  coalesceWrites(client);
  return client;
}

/**
 * The commands a client writes during one turn of the event loop leave in one socket write: the socket is
 * corked at the first write and uncorked in the loop's check phase (setImmediate). ioredis writes every
 * command on its own, and on this kind of machine each write to a loopback socket costs tens of microseconds
 * (the kernel runs Redis's side of TCP in it). Only the writes are batched: ioredis queues and answers each
 * command as before, and resends those a dropped connection left unanswered (corked ones among them). Each
 * new socket is wrapped on 'connect', before the ready check and the offline queue's commands go out. Copies
 * made with duplicate() (BullMQ's blocking connections, event-stream readers) are not wrapped. A Cluster client
 * wraps the connection to each node as the node is added.
 */
export function coalesceWrites(client: Redis): void {
  client.on('connect', () => {
    const stream = (client as unknown as { stream: Writable }).stream;
    const write = stream.write;
    let corked = false;
    const uncork = () => {
      corked = false;
      stream.uncork();
    };
    stream.write = ((...args: Parameters<Writable['write']>) => {
      if (!corked) {
        corked = true;
        stream.cork();
        setImmediate(uncork);
      }
      return write.apply(stream, args);
    }) as Writable['write'];
  });
}

/** Every key matching `pattern`: SCAN of the one Redis, or of every master of a Cluster. */
export async function scanKeys(redis: RedisClient, pattern: string): Promise<string[]> {
  // A cluster's masters are known once a command went through: its slot map is loaded by then.
  const servers: Redis[] = redis instanceof Cluster ? await redis.ping().then(() => redis.nodes('master')) : [redis];
  const out: string[] = [];
  for (const server of servers) {
    let cursor = '0';
    do {
      const [next, found] = await server.scan(cursor, 'MATCH', pattern, 'COUNT', 1000);
      cursor = next;
      out.push(...found);
    } while (cursor !== '0');
  }
  return out;
}

/** Runs a Lua script defined with defineScript: its KEYS, then its ARGV. */
export type RedisScript = (keys: readonly string[], args: readonly (string | number)[]) => Promise<unknown>;

/** The scripts defined on each client, by name, so that one name never stands for two scripts. */
const definedScripts = new WeakMap<RedisClient, Map<string, string>>();

/**
 * A Lua script run by EVALSHA (ioredis's defineCommand): the script text goes to Redis once per connection
 * (and again only if Redis answers NOSCRIPT, e.g. after a restart), not with every call as EVAL sends it.
 * Defined on the client under `name` (prefixed so it cannot shadow a Redis command) at its first call;
 * every store sharing the client shares the definition.
 */
export function defineScript(redis: RedisClient, name: string, lua: string): RedisScript {
  const command = `keyferry_${name}`;
  let run: ((...args: (string | number)[]) => Promise<unknown>) | undefined;
  return (keys, args) => {
    if (!run) {
      let defined = definedScripts.get(redis);
      if (!defined) definedScripts.set(redis, (defined = new Map()));
      const known = defined.get(command);
      if (known === undefined) {
        redis.defineCommand(command, { lua });
        defined.set(command, lua);
      } else if (known !== lua) {
        throw new Error(`a different script is already defined as ${command}`);
      }
      run = (redis as unknown as Record<string, (...args: (string | number)[]) => Promise<unknown>>)[command];
    }
    return (run as (...args: (string | number)[]) => Promise<unknown>).call(redis, keys.length, ...keys, ...args);
  };
}
