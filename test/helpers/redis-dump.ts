import net from 'node:net';
import { scanKeys, type RedisClient } from '../../shared/redis.js';
import { Keyspace } from '../../shared/stores/keyspace.js';

/** Every key under a prefix, BullMQ's included (on a Cluster, from every master). */
export async function keysUnder(redis: RedisClient, prefix: string): Promise<string[]> {
  const out: string[] = [];
  for (const pattern of new Keyspace(prefix).patterns) out.push(...(await scanKeys(redis, pattern)));
  return out;
}

/** Every value stored in `keys`, as text, whatever the Redis type. */
export async function valuesOf(redis: RedisClient, keys: string[]): Promise<string[]> {
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
export async function redisValuesUnder(redis: RedisClient, prefix: string): Promise<string[]> {
  return valuesOf(redis, await keysUnder(redis, prefix));
}

/** The intake rate limit's bucket, which every intake request writes, accepted or not. */
export const isRateLimitBucket = (key: string) => key.endsWith(':ratelimit');

/** Redis's escapes in MONITOR's quoted arguments (sdscatrepr): `\\`, `\"`, `\n` and the like, `\xHH`. */
const unescapeMonitorArg = (text: string) =>
  text.replace(/\\(x[0-9a-f]{2}|.)/g, (_, e: string) => (e.length === 3 ? String.fromCharCode(parseInt(e.slice(1), 16)) : ({ n: '\n', r: '\r', t: '\t', a: '\x07', b: '\b' } as Record<string, string>)[e] ?? e));

/**
 * Every command Redis runs from now on (Lua's own included), as MONITOR shows it, on a plain socket of its own
 * (REDIS_URL's host and port; no password or TLS). Arguments come as latin1 text, byte for byte; `client` is the
 * connection that sent the command (`127.0.0.1:port`), or `lua` for a script's own commands.
 * (ioredis's monitor() fails with "Command queue state error" when the first commands arrive together with
 * MONITOR's OK, as they do on a busy shared Redis.) Resolves once monitoring runs; call the result to stop.
 */
export async function monitorCommands(url: string, onCommand: (args: string[], client: string) => void): Promise<() => void> {
  const { hostname, port } = new URL(url);
  const socket = net.connect(Number(port || 6379), hostname);
  socket.setEncoding('latin1');
  let buffered = '';
  const started = new Promise<void>((resolve, reject) => {
    socket.on('error', reject);
    socket.on('connect', () => socket.write('MONITOR\r\n'));
    socket.on('data', (chunk: string) => {
      buffered += chunk;
      for (let end = buffered.indexOf('\r\n'); end >= 0; end = buffered.indexOf('\r\n')) {
        const line = buffered.slice(0, end);
        buffered = buffered.slice(end + 2);
        if (line === '+OK') resolve();
        else if (line.startsWith('-')) reject(new Error(line.slice(1)));
        else {
          const client = /^\S+ \[\d+ ([^\]]+)\]/.exec(line)?.[1] ?? '';
          onCommand([...line.matchAll(/"((?:[^"\\]|\\.)*)"/g)].map((m) => unescapeMonitorArg(m[1] ?? '')), client);
        }
      }
    });
  });
  await started;
  return () => socket.destroy();
}
