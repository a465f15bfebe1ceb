/**
 * Single-upload intake throughput (run by hand: `npm run bench:intake`, optional `-- --duration S --connections N
 * --rounds R`). Drives POST /api/v1/cckm/aws/upload-key with autocannon against the real API (no worker, so jobs
 * only queue; rate limiter set out of the way), next to a bare Express 5 JSON endpoint, alternating the two for R
 * rounds (which side goes first alternates too): this machine is shared, and its speed moves by tens of percent
 * from one minute to the next, so each round's ratio compares two runs made seconds apart, and the figure printed
 * is the median of those ratios. Then keyferry once more at half its median throughput to see p99 away from
 * saturation, twice: with autocannon's `overallRate`, and paced evenly. autocannon's rate limit lets each
 * connection send its budget for the second back to back from the top of each second, then wait for the next
 * (autocannon lib/httpClient.js), so its "half load" is full load for half of every second, and it corrects its
 * latencies for coordinated omission as if a request were due every millisecond. The paced run (`pacedLoad`)
 * starts request i at i / rate seconds, over as many keep-alive connections, and times each request from when it
 * was due to its answer's end (a request waiting for a free connection counts as waiting); its p99 is the one
 * the goal (p99 under 25 ms at half load) is judged by. The bare endpoint is paced at the same rate too: how much
 * of that p99 the machine and the load generator cause on their own. Each round also runs the bare endpoint plus
 * the Redis calls an accepted upload needs (`createBareRedisApp`): its ratio to the bare endpoint is the most
 * keyferry could reach while making them.
 * The servers and autocannon share this process; a run's "event loop busy %" (its event-loop utilization) below
 * 100 means the loop sat waiting, for Redis's answers, with every connection's request in flight.
 * Prints a markdown table. Uses the Redis at REDIS_URL under a throw-away prefix, deleted at the end.
 */
import type { Server } from 'node:http';
import { connect, type AddressInfo, type Socket } from 'node:net';
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
import { median, percentile } from './lib-bench.js';

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

interface PacedRun {
  rps: number;
  p50: number;
  p99: number;
  loopBusy: number;
}

/**
 * Open-loop load: `rate` requests per second for `seconds`, request i due at i / rate s from the start, each timed
 * from when it was due to the end of its answer. A request goes out on the first of `connections` keep-alive
 * connections that is free (one request at a time on each; one due while all are busy waits, and that wait
 * counts). The client is as thin as autocannon's (a prepared request's bytes written to the socket, the answer
 * read up to its Content-Length), so that it takes little of the event loop it shares with the server.
 */
async function pacedLoad(url: string, rate: number, seconds: number, connections: number): Promise<PacedRun> {
  const { hostname, port, pathname } = new URL(url);
  const head = [`POST ${pathname} HTTP/1.1`, `Host: ${hostname}:${port}`, ...Object.entries(headers).map(([k, v]) => `${k}: ${v}`), `Content-Length: ${Buffer.byteLength(body)}`, '', ''].join('\r\n');
  const wire = Buffer.from(head + body);
  const total = Math.max(1, Math.round(rate * seconds));
  const latencies: number[] = [];
  const due: number[] = [];
  const idle: Socket[] = [];
  let failures = 0;
  let done!: () => void;
  const finished = new Promise<void>((r) => (done = r));
  const settle = () => {
    if (latencies.length + failures === total) done();
  };
  const inFlightSince = new Map<Socket, number>();
  const sendNext = (socket: Socket) => {
    const at = due.shift();
    if (at === undefined) return void idle.push(socket);
    inFlightSince.set(socket, at);
    socket.write(wire);
  };
  const sockets = await Promise.all(
    Array.from({ length: connections }, () =>
      new Promise<Socket>((resolve, reject) => {
        const socket = connect(Number(port), hostname, () => resolve(socket));
        socket.once('error', reject);
        // A connection the server closes (its keep-alive timeout) leaves the pool; a request on it counts as failed.
        socket.on('close', () => {
          const at = idle.indexOf(socket);
          if (at >= 0) idle.splice(at, 1);
          if (inFlightSince.delete(socket)) {
            failures++;
            settle();
          }
        });
        let pending = Buffer.alloc(0);
        socket.on('data', (chunk: Buffer) => {
          pending = Buffer.concat([pending, chunk]);
          const end = pending.indexOf('\r\n\r\n');
          if (end < 0) return;
          const length = Number(/\r\ncontent-length: *(\d+)/i.exec(pending.subarray(0, end).toString('latin1'))?.[1] ?? NaN);
          if (pending.length < end + 4 + length) return;
          const status = Number(pending.subarray(9, 12).toString('latin1'));
          pending = pending.subarray(end + 4 + length);
          if (status >= 200 && status < 300) latencies.push(performance.now() - (inFlightSince.get(socket) ?? NaN));
          else failures++;
          inFlightSince.delete(socket);
          settle();
          sendNext(socket);
        });
      }),
    ),
  );
  idle.push(...sockets);
  const elu = performance.eventLoopUtilization();
  const start = performance.now();
  for (let i = 0; i < total; ) {
    // Every request due by now is queued and goes out on a free connection; then sleep until the next is due.
    while (i < total && start + (i * 1000) / rate <= performance.now()) {
      due.push(start + (i++ * 1000) / rate);
      // The connection free the longest: all of them stay in use, none sits idle past a keep-alive timeout.
      const free = idle.shift();
      if (free) sendNext(free);
    }
    if (i < total) await new Promise((r) => setTimeout(r, Math.max(0, start + (i * 1000) / rate - performance.now())));
  }
  const stuck = setTimeout(() => {
    failures = total - latencies.length; // those still unanswered
    done();
  }, 30_000 + seconds * 1000);
  await finished;
  clearTimeout(stuck);
  const elapsed = (performance.now() - start) / 1000;
  const loopBusy = performance.eventLoopUtilization(elu).utilization;
  for (const socket of sockets) socket.destroy();
  if (failures > 0) throw new Error(`paced half load: ${failures} requests did not get a 2xx (or no answer)`);
  const sorted = latencies.sort((a, b) => a - b);
  return { rps: total / elapsed, p50: percentile(sorted, 0.5), p99: percentile(sorted, 0.99), loopBusy };
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
  const paced = await pacedLoad(keyferryUrl, halfRate, DURATION, CONNECTIONS);
  const pacedBare = await pacedLoad(bareUrl, halfRate, DURATION, CONNECTIONS);

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
  console.log(row(`keyferry POST …/upload-key, half load (${halfRate} req/s; autocannon overallRate: bursts from the top of each second)`, half));
  const pacedRow = (what: string, r: PacedRun) => `| ${what} | ${r.rps.toFixed(0)} | ${r.p50.toFixed(1)} | ${r.p99.toFixed(1)} | ${Math.round(r.loopBusy * 100)} |  |`;
  console.log(pacedRow(`keyferry POST …/upload-key, half load (${halfRate} req/s; paced evenly)`, paced));
  console.log(pacedRow(`bare Express 5 JSON endpoint at the same rate, paced evenly`, pacedBare));
  console.log(`ratio keyferry / bare express (requests/s), median of ${ROUNDS} rounds: ${median(rounds.map((r) => r.ratio)).toFixed(2)}`);
  console.log(`ratio (bare express + Redis calls) / bare express, median of ${ROUNDS} rounds: ${median(rounds.map((r) => r.ceiling)).toFixed(2)}`);
  console.log(`p99 at half load, paced evenly: ${paced.p99.toFixed(1)} ms (goal under 25 ms: ${paced.p99 < 25 ? 'met' : 'missed'})`);
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
