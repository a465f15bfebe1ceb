/**
 * Intake cost in instructions (run by hand: `npm run bench:intake-instructions`, optional `-- --requests N
 * --warmup W`; needs valgrind, from Debian's packages). The throughput benchmark (`bench:intake`) moves by tens
 * of percent between runs on a shared machine; an instruction count moves less. Each server runs as a process of
 * its own under `valgrind --tool=callgrind`: the bare Express 5 JSON endpoint (bench/lib-bare-express.ts) and
 * keyferry's API (api/main.ts, logging silent as in `bench:intake`, against the Redis at REDIS_URL under a
 * throw-away prefix, deleted at the end). Node runs with `--single-threaded` (no helper threads: the JIT compiler
 * and the garbage collector work on the counted thread, and callgrind counts them too). Each server first gets W
 * POSTs, not counted (JIT, caches; counting starts with `callgrind_control -i on`), then N more, counted, all of
 * the same body and one after the other (what the JIT compiles, and so the count, depends on the order requests
 * come in); the figure is the instructions of the server process (user space; the kernel's part of the socket
 * calls is not counted) divided by N. Seen on this project's build machine: the bare endpoint's count was the
 * same to 0.1 % between runs from one checkout, idle or loaded, and 2 % apart between checkouts of the same
 * code; keyferry's moved by up to a third between runs of 500 counted requests (a major GC or a recompilation
 * falls inside the window or not), hence N = 3000 by default.
 * The ratio bare / keyferry is the throughput ratio keyferry would reach if both were bound by their own
 * CPU and the load generator cost nothing.
 */
import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { parseArgs } from 'node:util';
import { signToken } from '../shared/auth.js';
import { createRedis } from '../shared/redis.js';
import { deleteKeyspace } from '../shared/stores/keyspace.js';
import { testEnv } from '../test/helpers/stack.js';
import { freePort } from '../test/helpers/redis-server.js';
import { BENCH_JOB_ENV, fmt, intParam, machineLine, printTable, seed } from './lib-bench.js';

const { values } = parseArgs({ options: { requests: { type: 'string' }, warmup: { type: 'string' } } });
const N = intParam(values.requests, 'BENCH_N', 3000);
const WARMUP = intParam(values.warmup, 'BENCH_WARMUP', 6000, 0);

if (spawnSync('valgrind', ['--version']).status !== 0) {
  console.error('bench:intake-instructions needs valgrind (apt-get install valgrind)');
  process.exit(1);
}

const body = JSON.stringify({ source_key_identifier: 'test-key', region: 'ap-south-1', kms: 'kms', aws_param: { Alias: 'bench-intake', Tags: [{ TagKey: 'team', TagValue: 'bench' }] } });

interface Counted {
  instructions: number;
  requests: number;
}

/**
 * Starts `node --single-threaded --import tsx <entry>` under callgrind with counting off, waits for `ready`
 * (it returns the URL to POST to and the headers), sends the warm-up, counts N sequential requests, stops the
 * process with SIGTERM (callgrind writes its counts as the process exits).
 */
async function measure(entry: string[], env: Record<string, string>, ready: (lines: string[]) => Promise<{ url: string; headers: Record<string, string> }>): Promise<Counted> {
  // %p: each process valgrind runs writes a file of its own (a forked helper must not overwrite the server's).
  const outPattern = join(tmpdir(), `keyferry-callgrind-${randomBytes(4).toString('hex')}.%p.out`);
  const childEnv = { PATH: process.env.PATH ?? '', ...env, UV_THREADPOOL_SIZE: '1' };
  const child = spawn('valgrind', ['--tool=callgrind', '--instr-atstart=no', `--callgrind-out-file=${outPattern}`, process.execPath, '--single-threaded', '--import', 'tsx', ...entry], {
    env: childEnv,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const lines: string[] = [];
  createInterface({ input: child.stdout }).on('line', (l) => lines.push(l));
  createInterface({ input: child.stderr }).on('line', (l) => lines.push(l));
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  const outFile = outPattern.replace('%p', String(child.pid));
  try {
    const target = await Promise.race([
      ready(lines),
      exited.then((code) => {
        throw new Error(`${entry.join(' ')} exited (${code}) before it was ready:\n${lines.join('\n')}`);
      }),
    ]);
    const post = async () => {
      const res = await fetch(target.url, { method: 'POST', headers: target.headers, body });
      await res.arrayBuffer();
      if (res.status !== 202) throw new Error(`${target.url} answered ${res.status}`);
    };
    for (let i = 0; i < WARMUP; i++) await post();
    const control = (on: boolean) => {
      // In the server's environment: valgrind names its vgdb pipe after USER and HOST (keyferry's HOST setting too).
      const r = spawnSync('callgrind_control', ['-i', on ? 'on' : 'off', String(child.pid)], { env: childEnv, timeout: 60_000 });
      if (r.status !== 0) throw new Error(`callgrind_control failed: ${r.stderr.toString()}`);
    };
    control(true);
    for (let i = 0; i < N; i++) await post();
    control(false);
    // The counts are written as the process exits; a server that does not stop within a minute fails the run.
    child.kill('SIGTERM');
    const stopped = await Promise.race([exited.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 60_000).unref())]);
    if (!stopped) throw new Error(`${entry.join(' ')} did not exit within 60 s of SIGTERM`);
    const totals = /^totals: (\d+)$/m.exec(await readFile(outFile, 'utf8'));
    // Zero: callgrind_control reached no server (it still exits 0), so nothing was counted.
    if (!totals || Number(totals[1]) === 0) throw new Error(`callgrind counted nothing for ${entry.join(' ')}`);
    return { instructions: Number(totals[1]), requests: N };
  } finally {
    child.kill('SIGKILL');
    await rm(outFile, { force: true });
  }
}

/** Waits for a line matching `re` among those the process printed so far or prints later. */
async function lineMatching(lines: string[], re: RegExp, timeoutMs = 120_000): Promise<RegExpExecArray> {
  for (const deadline = Date.now() + timeoutMs; Date.now() < deadline; ) {
    for (const l of lines) {
      const m = re.exec(l);
      if (m) return m;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`no line matching ${re} within ${timeoutMs} ms:\n${lines.join('\n')}`);
}

const bare = await measure(['bench/lib-bare-express.ts'], {}, async (lines) => {
  const m = await lineMatching(lines, /"msg":"bare listening","url":"([^"]+)"/);
  return { url: m[1] as string, headers: { 'content-type': 'application/json' } };
});

const env = testEnv('bench-instructions', {
  REDIS_URL: process.env.REDIS_URL ?? 'redis://127.0.0.1:6379',
  LOG_LEVEL: 'silent',
  PORT: String(await freePort()),
  ...BENCH_JOB_ENV,
});
let keyferry: Counted;
try {
  keyferry = await measure(['api/main.ts'], env, async () => {
    const base = `http://127.0.0.1:${env.PORT}`;
    for (const deadline = Date.now() + 120_000; ; ) {
      const up = await fetch(`${base}/healthz`).then((r) => r.ok, () => false);
      if (up) break;
      if (Date.now() > deadline) throw new Error('keyferry did not answer /healthz within 120 s');
      await new Promise((r) => setTimeout(r, 250));
    }
    const token = await signToken({ secret: env.JWT_SECRET as string, account: 'bench' });
    const headers = { authorization: `Bearer ${token}`, 'content-type': 'application/json' };
    await seed(base, token, '/api/v1/cckm/aws/kms', { name: 'kms', account_id: '123456789012', regions: ['ap-south-1'], endpoint: 'http://127.0.0.1:1' });
    await seed(base, token, '/api/v1/vault/keys2', { name: 'test-key' });
    return { url: `${base}/api/v1/cckm/aws/upload-key`, headers };
  });
} finally {
  const redis = createRedis({ REDIS_URL: env.REDIS_URL as string, REDIS_CLUSTER_NODES: undefined });
  await deleteKeyspace(redis, env.KEYFERRY_PREFIX as string);
  redis.disconnect();
}

const perRequest = (c: Counted) => c.instructions / c.requests / 1000;
console.log(machineLine());
console.log(`intake instructions: ${N} sequential POSTs counted after ${WARMUP} not counted; valgrind callgrind, node --single-threaded`);
printTable(
  ['server', 'thousand instructions per request'],
  [
    ['bare Express 5 JSON endpoint (express.json, 202)', fmt(perRequest(bare), 1)],
    ['keyferry POST …/upload-key (logging silent)', fmt(perRequest(keyferry), 1)],
  ],
);
console.log(`ratio bare / keyferry instructions per request: ${(perRequest(bare) / perRequest(keyferry)).toFixed(3)}`);
process.exit(0);
