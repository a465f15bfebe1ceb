/**
 * The bare Express 5 JSON endpoints the intake benchmarks compare keyferry with:
 * - `createBareApp`: express.json, then a 202 with a small JSON body;
 * - `createBareRedisApp`: the same, plus the Redis work a keyferry upload cannot do without, in keyferry's order
 *   and on one connection made by createRedis, whose writes are coalesced as keyferry's are: a small
 *   Lua script (the rate-limit token), a read (the KMS connection), a write of a record the size of keyferry's
 *   job record and a BullMQ add, the last two sent together. No auth, validation, logging or metrics: what is
 *   left of keyferry's cost once everything but its Redis round trips is taken away.
 * Run as a process of its own (`node --import tsx bench/lib-bare-express.ts`, with `--redis URL --prefix P` for
 * the second), it listens on an ephemeral loopback port and prints `{"msg":"bare listening","url":…}`.
 */
import type { AddressInfo } from 'node:net';
import { randomUUID } from 'node:crypto';
import { parseArgs } from 'node:util';
import { pathToFileURL } from 'node:url';
import { Queue } from 'bullmq';
import express, { type Express } from 'express';
import { createRedis, defineScript } from '../shared/redis.js';

export function createBareApp(): Express {
  const app = express();
  app.use(express.json());
  app.post('/upload-key', (req, res) => {
    res.status(202).json({ id: 'bare', status: 'queued', alias: aliasOf(req.body) });
  });
  return app;
}

function aliasOf(body: unknown): string | undefined {
  return (body as { aws_param?: { Alias?: string } } | undefined)?.aws_param?.Alias;
}

/** A token taken from a per-account hash, as keyferry's rate limit does (one EVALSHA). */
const TAKE_TOKEN = `redis.call('HINCRBY', KEYS[1], 'tokens', -1) redis.call('PEXPIRE', KEYS[1], 60000) return 0`;
/** About the size of a new keyferry job record (request, progress, times). */
const RECORD_PAD = 'x'.repeat(1200);

/** On the Redis at `url`, through createRedis as keyferry's clients are (its writes coalesced); close() closes it. */
export function createBareRedisApp(url: string, prefix: string): { app: Express; close(): Promise<void> } {
  const redis = createRedis({ REDIS_URL: url, REDIS_CLUSTER_NODES: undefined }, { lazyConnect: true });
  const takeToken = defineScript(redis, 'bench_take_token', TAKE_TOKEN);
  const queue = new Queue('bare-uploads', { connection: redis, prefix: `${prefix}:bull` });
  const app = express();
  app.use(express.json());
  app.post('/upload-key', async (req, res) => {
    await takeToken([`${prefix}:rate`], []);
    await redis.get(`${prefix}:kms-connection`);
    const id = randomUUID();
    // Sent together, as keyferry's intake does on one Redis: the record first, then the add.
    await Promise.all([
      redis.set(`${prefix}:job:${id}`, JSON.stringify({ id, request: req.body as unknown, pad: RECORD_PAD }), 'EX', 3600),
      queue.add('upload-key', { jobId: id, account: 'bench' }, { jobId: id, removeOnComplete: true, removeOnFail: true }),
    ]);
    res.status(202).json({ id, status: 'queued', alias: aliasOf(req.body) });
  });
  return {
    app,
    async close() {
      await queue.close();
      redis.disconnect();
    },
  };
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  const { values } = parseArgs({ options: { redis: { type: 'string' }, prefix: { type: 'string' } } });
  const withRedis = values.redis ? createBareRedisApp(values.redis, values.prefix ?? 'bench-bare') : undefined;
  const server = (withRedis?.app ?? createBareApp()).listen(0, '127.0.0.1', () => {
    console.log(JSON.stringify({ msg: 'bare listening', url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/upload-key` }));
  });
  process.once('SIGTERM', () => server.close(() => process.exit(0)));
}
