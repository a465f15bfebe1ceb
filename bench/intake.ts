/**
 * Single-upload intake throughput (run by hand: `npm run bench:intake`, optional `-- --duration S --connections N
 * --rounds R`). Drives POST /api/v1/cckm/aws/upload-key with autocannon against the real API (no worker, so jobs
 * only queue; rate limiter set out of the way), next to a bare Express 5 JSON endpoint, alternating the two for R
 * rounds (which side goes first alternates too): this machine is shared, and its speed moves by tens of percent
 * from one minute to the next, so each round's ratio compares two runs made seconds apart, and the figure printed
 * is the median of those ratios. Then keyferry once more at half its median throughput to see p99 away from
 * saturation. Each round also runs the bare endpoint plus the Redis calls an accepted upload needs
 * (`createBareRedisApp`): its ratio to the bare endpoint is the most keyferry could reach while making them.
 * The servers and autocannon share this process; a run's "event loop busy %" (its event-loop utilization) below
 * 100 means the loop sat waiting, for Redis's answers, with every connection's request in flight.
 * Prints a markdown table. Uses the Redis at REDIS_URL under a throw-away prefix, deleted at the end.
 */
import type { Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import autocannon, { type Options, type Result } from 'autocannon';
import { Redis } from 'ioredis';
import { startApi } from '../api/server.js';
import { signToken } from '../shared/auth.js';
import { loadConfig } from '../shared/config.js';
import { createLogger } from '../shared/logger.js';
import { deleteKeyspace } from '../shared/stores/keyspace.js';
import { testEnv } from '../test/helpers/stack.js';
import { createBareApp, createBareRedisApp } from './lib-bare-express.js';
import { median } from './lib-bench.js';

const { values } = parseArgs({
  options: { duration: { type: 'string', default: '10' }, connections: { type: 'string', default: '20' }, rounds: { type: 'string', default: '3' } },
});
const positiveInt = (name: string, v: string) => {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1) throw new Error(`--${name} must be a positive integer, got ${v}`);
  return n;
};
const DURATION = positiveInt('duration', values.duration);
const CONNECTIONS = positiveInt('connections', values.connections);
const ROUNDS = positiveInt('rounds', values.rounds);

const config = loadConfig(
  testEnv('bench-intake', {
    REDIS_URL: process.env.REDIS_URL ?? 'redis://127.0.0.1:6379',
    LOG_LEVEL: 'silent',
    INTAKE_RATE_PER_SECOND: '1000000',
    INTAKE_BURST: '1000000',
  }),
);
const prefix = config.KEYFERRY_PREFIX;
const redis = new Redis(config.REDIS_URL);
const api = await startApi(config, createLogger('silent'));

const listen = (app: ReturnType<typeof createBareApp>) =>
  new Promise<Server>((resolve, reject) => {
    const s = app.listen(0, '127.0.0.1', (err?: Error) => (err ? reject(err) : resolve(s)));
  });
const urlOf = (server: Server) => `http://127.0.0.1:${(server.address() as AddressInfo).port}/upload-key`;
const bare = await listen(createBareApp());
const bareUrl = urlOf(bare);
const bareRedisApp = createBareRedisApp(config.REDIS_URL, `${prefix}:bare`);
const bareRedis = await listen(bareRedisApp.app);
const bareRedisUrl = urlOf(bareRedis);

const token = await signToken({ secret: config.JWT_SECRET, account: 'bench' });
const headers = { authorization: `Bearer ${token}`, 'content-type': 'application/json' };
const body = JSON.stringify({ source_key_identifier: 'test-key', region: 'ap-south-1', kms: 'kms', aws_param: { Alias: 'bench-intake', Tags: [{ TagKey: 'team', TagValue: 'bench' }] } });

/** An autocannon run and how busy this process's event loop was meanwhile (0–1; the servers and autocannon share it). */
interface Run extends Result {
  loopBusy: number;
}

/** Runs autocannon and fails the benchmark if any request did not get a 2xx (a 429 or 503 would flatter the numbers). */
async function load(label: string, opts: Omit<Options, 'method' | 'headers' | 'body'>): Promise<Run> {
  const elu = performance.eventLoopUtilization();
  const r = await autocannon({ method: 'POST', headers, body, ...opts });
  const loopBusy = performance.eventLoopUtilization(elu).utilization;
  if (r.non2xx > 0 || r.errors > 0 || r.timeouts > 0) throw new Error(`${label}: ${r.non2xx} non-2xx, ${r.errors} errors, ${r.timeouts} timeouts`);
  return { ...r, loopBusy };
}

try {
  const post = async (path: string, payload: unknown) => {
    const res = await fetch(`${api.url}${path}`, { method: 'POST', headers, body: JSON.stringify(payload) });
    await res.text();
    if (res.status !== 201) throw new Error(`seeding ${path} answered ${res.status}`);
  };
  await post('/api/v1/cckm/aws/kms', { name: 'kms', account_id: '123456789012', regions: ['ap-south-1'], endpoint: 'http://127.0.0.1:1' });
  await post('/api/v1/vault/keys2', { name: 'test-key' });

  const keyferryUrl = `${api.url}/api/v1/cckm/aws/upload-key`;
  // Short warm-up of both servers (JIT, connection pools), not measured.
  await load('bare warm-up', { url: bareUrl, connections: CONNECTIONS, amount: 200 });
  await load('bare + Redis warm-up', { url: bareRedisUrl, connections: CONNECTIONS, amount: 200 });
  await load('keyferry warm-up', { url: keyferryUrl, connections: CONNECTIONS, amount: 200 });

  const rps = (r: Result) => r.requests.total / r.duration;
  const rounds: { bare: Run; bareRedis: Run; full: Run; ratio: number; ceiling: number }[] = [];
  const sides = [
    ['bare', 'bare express', bareUrl],
    ['bareRedis', 'bare express + Redis calls', bareRedisUrl],
    ['full', 'keyferry full load', keyferryUrl],
  ] as const;
  for (let i = 0; i < ROUNDS; i++) {
    // Which side goes first alternates (A-B-C, C-B-A, ...), so a steady drift of the machine's speed does not favour one.
    const run: Partial<Record<(typeof sides)[number][0], Run>> = {};
    for (const [side, label, url] of i % 2 === 0 ? sides : [...sides].reverse()) {
      run[side] = await load(label, { url, connections: CONNECTIONS, duration: DURATION });
    }
    const { bare: bareRun, bareRedis: bareRedisRun, full } = run as Record<(typeof sides)[number][0], Run>;
    rounds.push({ bare: bareRun, bareRedis: bareRedisRun, full, ratio: rps(full) / rps(bareRun), ceiling: rps(bareRedisRun) / rps(bareRun) });
  }
  const halfRate = Math.max(1, Math.round(median(rounds.map((r) => rps(r.full))) / 2));
  const half = await load('keyferry half load', { url: keyferryUrl, connections: CONNECTIONS, duration: DURATION, overallRate: halfRate });

  const row = (what: string, r: Run, ratio = '') =>
    `| ${what} | ${rps(r).toFixed(0)} | ${r.latency.p50} | ${r.latency.p99} | ${Math.round(r.loopBusy * 100)} | ${ratio} |`;
  console.log(`single upload intake, ${CONNECTIONS} connections, ${DURATION} s per run, ${ROUNDS} rounds (node ${process.version}, ${process.platform}/${process.arch})`);
  console.log('| what | requests/s | p50 ms | p99 ms | event loop busy % | ratio to the bare endpoint |');
  console.log('|---|---|---|---|---|---|');
  rounds.forEach((r, i) => {
    console.log(row(`round ${i + 1}: bare Express 5 JSON endpoint (express.json, 202)`, r.bare));
    console.log(row(`round ${i + 1}: bare endpoint + the Redis calls an upload needs`, r.bareRedis, r.ceiling.toFixed(2)));
    console.log(row(`round ${i + 1}: keyferry POST …/upload-key, full load`, r.full, r.ratio.toFixed(2)));
  });
  console.log(row(`keyferry POST …/upload-key, half load (${halfRate} req/s)`, half));
  console.log(`ratio keyferry / bare express (requests/s), median of ${ROUNDS} rounds: ${median(rounds.map((r) => r.ratio)).toFixed(2)}`);
  console.log(`ratio (bare express + Redis calls) / bare express, median of ${ROUNDS} rounds: ${median(rounds.map((r) => r.ceiling)).toFixed(2)}`);
} finally {
  for (const server of [bare, bareRedis]) {
    await new Promise<void>((resolve) => {
      server.close(() => resolve());
      server.closeAllConnections();
    });
  }
  await bareRedisApp.close();
  api.server.closeAllConnections(); // autocannon may leave sockets open; close() would wait on them
  await api.close();
  await deleteKeyspace(redis, prefix);
  redis.disconnect();
}
// Something in autocannon keeps the event loop alive after the runs end; everything of ours is closed by now.
process.exit(0);
