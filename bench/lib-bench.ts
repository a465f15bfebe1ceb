/**
 * Shared helpers of the pipeline, quota and worker-cost benchmarks: parameters, the machine line, a private
 * redis-server, worker child processes, /proc readings, Prometheus scraping, the bare KMS upload sequence.
 */
import { execFileSync } from 'node:child_process';
import { constants, createPublicKey, publicEncrypt } from 'node:crypto';
import { readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import {
  CreateAliasCommand,
  CreateKeyCommand,
  DescribeKeyCommand,
  GetKeyPolicyCommand,
  GetKeyRotationStatusCommand,
  GetParametersForImportCommand,
  ImportKeyMaterialCommand,
  ListAliasesCommand,
  ListResourceTagsCommand,
  KMSClient,
} from '@aws-sdk/client-kms';
import { Redis } from 'ioredis';
import { DEFAULT_KMS_QUOTAS, type KmsOperation } from '../shared/kms-quotas.js';
import { kmsRequestHandler } from '../worker/kms-clients.js';
import { runEntry, type Child } from '../test/helpers/child.js';
import { OwnRedis } from '../test/helpers/redis-server.js';
import { testEnv } from '../test/helpers/stack.js';

/** The tags of every benchmark upload: the bare sequence and keyferry must send the same requests. */
export const BENCH_TAGS = [{ TagKey: 'team', TagValue: 'bench' }];

/** Intake limits out of the way and keyferry's default retries, for benchmarks that push many jobs through. */
export const BENCH_JOB_ENV = { INTAKE_RATE_PER_SECOND: '1000000', INTAKE_BURST: '1000000', JOB_ATTEMPTS: '8', JOB_BACKOFF_MS: '1000' };

/** A positive integer parameter: `--flag` if given, else the environment variable, else the default. */
export function intParam(flag: string | undefined, envName: string, fallback: number, min = 1): number {
  const raw = flag ?? process.env[envName] ?? String(fallback);
  const n = Number(raw);
  if (!Number.isInteger(n) || n < min) throw new Error(`${envName} must be an integer ≥ ${min}, got ${raw}`);
  return n;
}

/** The machine the figures come from: cores, CPU model, memory, Node, OS, load (this machine is shared). */
export function machineLine(): string {
  const cpus = os.cpus();
  const load = os.loadavg().map((l) => l.toFixed(2)).join(' ');
  return `machine: ${cpus.length} × ${cpus[0]?.model.trim() ?? 'unknown CPU'}, ${(os.totalmem() / 2 ** 30).toFixed(1)} GiB, node ${process.version}, ${os.platform()}/${os.arch()}, load average (1/5/15 min, when printed) ${load}`;
}

/** Prints a markdown table. */
export function printTable(headers: string[], rows: (string | number)[][]): void {
  console.log(`| ${headers.join(' | ')} |`);
  console.log(`|${headers.map(() => '---').join('|')}|`);
  for (const row of rows) console.log(`| ${row.join(' | ')} |`);
}

export const fmt = (n: number, digits = 1) => (Number.isFinite(n) ? n.toFixed(digits) : 'n/a');

/** AWS's quotas × factor, for every operation. */
export function scaledQuotas(factor: number): Record<KmsOperation, number> {
  return Object.fromEntries(Object.entries(DEFAULT_KMS_QUOTAS).map(([op, rps]) => [op, rps * factor])) as Record<KmsOperation, number>;
}

/** The KMS_QUOTAS value (`Op=rate,…`) of a quota table. */
export function kmsQuotasEnv(quotas: Record<string, number>): string {
  return Object.entries(quotas).map(([op, rps]) => `${op}=${rps}`).join(',');
}

/** KMS_QUOTAS turning metering off for every operation: no slot is taken in Redis before a KMS request. */
export const QUOTAS_OFF = 'off';
/** KMS_QUOTAS that never bind but are metered: a slot is taken in Redis before every KMS request, as in production. */
export const QUOTAS_METERED_UNBOUND = kmsQuotasEnv(Object.fromEntries(Object.keys(DEFAULT_KMS_QUOTAS).map((op) => [op, 1_000_000])));

/** Binds every thread of process `pid` to CPU `cpu` (taskset, from util-linux). */
export function pinToCpu(pid: number, cpu: number): void {
  execFileSync('taskset', ['-a', '-p', '-c', String(cpu), String(pid)], { stdio: 'ignore' });
}

/**
 * The settings of the pipeline benchmarks' keyferry (bench:pipeline, bench:pipeline-instructions): its Redis,
 * LOG_LEVEL=info, the workers' concurrency (uploads in flight) and prefetch (jobs held ahead, none in flight;
 * the default when not given), KMS quotas off, the KMS deadline, the wrapping key's spec.
 */
export function pipelineEnv(name: string, o: { redisUrl: string; concurrency: number; prefetch?: number | undefined; kmsTimeoutMs: number; keySpec: string }): Record<string, string> {
  return testEnv(name, {
    REDIS_URL: o.redisUrl,
    LOG_LEVEL: 'info',
    WORKER_CONCURRENCY: String(o.concurrency),
    ...(o.prefetch === undefined ? {} : { WORKER_PREFETCH: String(o.prefetch) }),
    KMS_QUOTAS: QUOTAS_OFF,
    KMS_TIMEOUT_MS: String(o.kmsTimeoutMs),
    DEFAULT_WRAPPING_KEY_SPEC: o.keySpec,
    ...BENCH_JOB_ENV,
  });
}

const CLK_TCK = (() => {
  try {
    return Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
  } catch {
    return 100;
  }
})();

/** CPU time (user + system) a process has used so far, ms, from /proc/<pid>/stat (clock-tick resolution). */
export function procCpuMs(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  // Fields after the command name (which may hold spaces) start at field 3; utime and stime are fields 14 and 15.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return ((Number(fields[11]) + Number(fields[12])) * 1000) / CLK_TCK;
}

/**
 * How long the main thread of process `pid` (the thread whose id is the pid) has waited, runnable, for a CPU
 * (its run-queue wait, the second field of /proc/<pid>/schedstat), ms; NaN where the kernel does not say.
 */
export function mainThreadRunQueueMs(pid: number): number {
  try {
    return Number(readFileSync(`/proc/${pid}/schedstat`, 'utf8').trim().split(' ')[1]) / 1e6;
  } catch {
    return NaN;
  }
}

/** VmHWM (peak resident set) and VmRSS of a process, MiB, from /proc/<pid>/status. */
export function procMemoryMiB(pid: number): { peak: number; now: number } {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = (field: string) => Number(new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(status)?.[1] ?? NaN);
  return { peak: kb('VmHWM') / 1024, now: kb('VmRSS') / 1024 };
}

/** Read system calls a process has made, from /proc/<pid>/io (for redis-server: about one per client round trip). */
export function procReadSyscalls(pid: number): number {
  return Number(/^syscr:\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/io`, 'utf8'))?.[1] ?? NaN);
}

/** CPU time of this process so far, ms. */
export function selfCpuMs(): number {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1000;
}

export interface PrivateRedis {
  url: string;
  pid: number;
  version: string;
  /** A client for the benchmark's own reads (INFO, polls); its commands are few and named where counted. */
  client: Redis;
  /** Redis's own CPU time so far (INFO cpu), ms. */
  cpuMs(): Promise<number>;
  stop(): Promise<void>;
}

/**
 * A redis-server of the benchmark's own (test/helpers/redis-server.ts), so that other users of the shared Redis
 * neither slow the run nor show up in its counts. OwnRedis persists with `appendfsync always` (for crash
 * tests); the benchmarks switch it to `everysec`, what the README recommends for production.
 */
export async function startPrivateRedis(): Promise<PrivateRedis> {
  // OwnRedis probes the port until redis-server listens, with a client that has no error listener: ioredis
  // prints each refused probe as an "Unhandled error event". Those lines are expected; they are left out.
  const consoleError = console.error;
  console.error = (...args: unknown[]) => {
    if (!String(args[0]).startsWith('[ioredis] Unhandled error event')) consoleError(...args);
  };
  let own: OwnRedis;
  try {
    own = await OwnRedis.start();
  } finally {
    console.error = consoleError;
  }
  // However the benchmark ends (an error, Ctrl-C), the redis-server and its directory go with it.
  const killOnExit = () => {
    own.kill().catch(() => undefined);
    rmSync(own.dir, { recursive: true, force: true });
  };
  process.once('exit', killOnExit);
  const client = new Redis(own.url, { maxRetriesPerRequest: 1 });
  await client.config('SET', 'appendfsync', 'everysec');
  const server = await client.info('server');
  const pid = Number(/^process_id:(\d+)/m.exec(server)?.[1]);
  const version = /^redis_version:(\S+)/m.exec(server)?.[1] ?? '?';
  return {
    url: own.url,
    pid,
    version,
    client,
    async cpuMs() {
      const info = await client.info('cpu');
      const sec = (f: string) => Number(new RegExp(`^${f}:([\\d.]+)`, 'm').exec(info)?.[1] ?? 0);
      return (sec('used_cpu_user') + sec('used_cpu_sys')) * 1000;
    },
    async stop() {
      client.disconnect();
      process.off('exit', killOnExit);
      await own.stop();
    },
  };
}

/** `INFO commandstats` as command → calls. */
export async function commandCalls(redis: Redis): Promise<Map<string, number>> {
  const calls = new Map<string, number>();
  for (const m of (await redis.info('commandstats')).matchAll(/^cmdstat_([^:]+):calls=(\d+)/gm)) calls.set(m[1] as string, Number(m[2]));
  return calls;
}

export interface WorkerProcess {
  child: Child;
  pid: number;
  metricsUrl: string;
  /** SIGTERM, then SIGKILL if it has not exited within 10 s. */
  stop(): Promise<void>;
}

// Ctrl-C or a kill: exit through process.exit, so that the 'exit' handlers below stop every child process.
for (const signal of ['SIGINT', 'SIGTERM'] as const) process.once(signal, () => process.exit(1));

const running = new Set<Child>();
// A benchmark that throws must not leave worker processes behind.
process.once('exit', () => {
  for (const c of running) c.proc.kill('SIGKILL');
});

/**
 * A keyferry worker as its own process (worker/main.ts), as in production; resolves once it logged "worker
 * started". With BENCH_CPU_PROF_DIR set, the worker writes a V8 CPU profile (.cpuprofile) there when it exits.
 */
export async function startWorkerProcess(env: Record<string, string>): Promise<WorkerProcess> {
  const profDir = process.env.BENCH_CPU_PROF_DIR;
  // runEntry runs `node --import tsx <entry> <args>`: node's own flags (not allowed in NODE_OPTIONS) go first.
  const child = profDir ? runEntry('--cpu-prof', env, [`--cpu-prof-dir=${profDir}`, 'worker/main.ts']) : runEntry('worker/main.ts', env);
  running.add(child);
  const started = await Promise.race([
    child.waitForLog('worker started', 30_000),
    child.exited.then((how) => {
      throw new Error(`the worker exited (${JSON.stringify(how)}) before it started:\n${child.output.join('\n')}`);
    }),
  ]);
  const pid = child.proc.pid as number;
  return {
    child,
    pid,
    metricsUrl: String(started.metrics_url),
    async stop() {
      if (child.proc.exitCode === null && child.proc.signalCode === null) {
        const timer = setTimeout(() => child.proc.kill('SIGKILL'), 10_000);
        child.proc.kill('SIGTERM');
        await child.exited;
        clearTimeout(timer);
      }
      running.delete(child);
    },
  };
}

/** Sums and counts of a Prometheus histogram by one label, from a text exposition. */
export async function scrapeHistogram(url: string, name: string, label: string): Promise<Map<string, { sum: number; count: number }>> {
  const text = await (await fetch(url)).text();
  const out = new Map<string, { sum: number; count: number }>();
  for (const m of text.matchAll(new RegExp(`^${name}_(sum|count)\\{([^}]*)\\} (\\S+)$`, 'gm'))) {
    const value = new RegExp(`${label}="([^"]*)"`).exec(m[2] as string)?.[1] ?? '';
    const entry = out.get(value) ?? { sum: 0, count: 0 };
    entry[m[1] as 'sum' | 'count'] += Number(m[3]);
    out.set(value, entry);
  }
  return out;
}

/** The values of unlabelled Prometheus metrics (gauges), from one scrape; NaN for one absent. */
export async function scrapeValues<K extends string>(url: string, names: K[]): Promise<Record<K, number>> {
  const text = await (await fetch(url)).text();
  return Object.fromEntries(names.map((name) => [name, Number(new RegExp(`^${name} (\\S+)`, 'm').exec(text)?.[1] ?? NaN)])) as Record<K, number>;
}

/** Histogram a − b (what happened between two scrapes). */
export function histogramDelta(a: Map<string, { sum: number; count: number }>, b: Map<string, { sum: number; count: number }>) {
  const out = new Map<string, { sum: number; count: number }>();
  for (const [k, v] of a) out.set(k, { sum: v.sum - (b.get(k)?.sum ?? 0), count: v.count - (b.get(k)?.count ?? 0) });
  return out;
}

/** Runs `task(i)` for i in [0, n) with at most `concurrency` at once. */
export async function runPool(n: number, concurrency: number, task: (i: number) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(n, concurrency) }, async () => {
      while (next < n) await task(next++);
    }),
  );
}

/**
 * The bare sequence's client for a region: set up as keyferry's (worker/kms-clients.ts): no SDK retries, the
 * same deadline, each command's middleware resolved once (so only keyferry's own work tells them apart).
 */
export function bareKmsClient(opts: { region: string; endpoint: string; accessKeyId: string; secretAccessKey: string; timeoutMs: number }): KMSClient {
  return new KMSClient({
    region: opts.region,
    endpoint: opts.endpoint,
    credentials: { accessKeyId: opts.accessKeyId, secretAccessKey: opts.secretAccessKey },
    maxAttempts: 1,
    cacheMiddleware: true,
    requestHandler: kmsRequestHandler(opts.timeoutMs),
  });
}

/** The KMS operations of one upload, in the order keyferry's pipeline sends them (worker/pipeline.ts). */
export const UPLOAD_OPERATIONS = [
  'CreateKey',
  'CreateAlias',
  'GetParametersForImport',
  'ImportKeyMaterial',
  'DescribeKey',
  'GetKeyPolicy',
  'ListAliases',
  'ListResourceTags',
  'GetKeyRotationStatus',
] as const;

export interface BareUpload {
  alias: string;
  /** The value of the `keyferry:job-id` tag keyferry puts on each key (kept so the requests are the same size). */
  jobTag: string;
  material: Buffer;
  keySpec: 'RSA_2048' | 'RSA_3072' | 'RSA_4096';
  tags: { TagKey: string; TagValue: string }[];
}

/** The step an upload of the bare sequence was at when it failed. */
export class BareUploadError extends Error {
  constructor(
    readonly step: string,
    override readonly cause: Error,
  ) {
    super(`${step}: ${cause.name}: ${cause.message}`);
    this.name = 'BareUploadError';
  }
}

/**
 * The KMS requests of one keyferry upload (worker/pipeline.ts, happy path), sent directly and in the same
 * order: CreateKey (EXTERNAL), then CreateAlias and GetParametersForImport at once, RSA-OAEP-SHA-256 wrap,
 * ImportKeyMaterial, then DescribeKey, GetKeyPolicy, ListAliases, ListResourceTags and GetKeyRotationStatus
 * at once. Nothing is recorded anywhere.
 */
export async function bareUpload(client: KMSClient, u: BareUpload): Promise<void> {
  const at = async <T>(step: string, call: () => Promise<T>): Promise<T> => {
    try {
      return await call();
    } catch (err) {
      throw new BareUploadError(step, err as Error);
    }
  };
  const created = await at('CreateKey', () =>
    client.send(
      new CreateKeyCommand({
        Origin: 'EXTERNAL',
        KeySpec: 'SYMMETRIC_DEFAULT',
        KeyUsage: 'ENCRYPT_DECRYPT',
        Description: '',
        Tags: [...u.tags, { TagKey: 'keyferry:job-id', TagValue: u.jobTag }],
        MultiRegion: false,
        BypassPolicyLockoutSafetyCheck: false,
      }),
    ),
  );
  const KeyId = created.KeyMetadata?.KeyId as string;
  const [, params] = await Promise.all([
    at('CreateAlias', () => client.send(new CreateAliasCommand({ AliasName: `alias/${u.alias}`, TargetKeyId: KeyId }))),
    at('GetParametersForImport', () => client.send(new GetParametersForImportCommand({ KeyId, WrappingAlgorithm: 'RSAES_OAEP_SHA_256', WrappingKeySpec: u.keySpec }))),
  ]);
  const publicKey = createPublicKey({ key: Buffer.from(params.PublicKey as Uint8Array), format: 'der', type: 'spki' });
  const wrapped = publicEncrypt({ key: publicKey, padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: 'sha256' }, u.material);
  await at('ImportKeyMaterial', () =>
    client.send(new ImportKeyMaterialCommand({ KeyId, ImportToken: params.ImportToken, EncryptedKeyMaterial: wrapped, ExpirationModel: 'KEY_MATERIAL_DOES_NOT_EXPIRE' })),
  );
  await at('describe', () =>
    Promise.all([
      client.send(new DescribeKeyCommand({ KeyId })),
      client.send(new GetKeyPolicyCommand({ KeyId, PolicyName: 'default' })),
      client.send(new ListAliasesCommand({ KeyId })),
      client.send(new ListResourceTagsCommand({ KeyId })),
      client.send(new GetKeyRotationStatusCommand({ KeyId })).catch((err: Error) => {
        if (err.name === 'UnsupportedOperationException') return { KeyRotationEnabled: false };
        throw err;
      }),
    ]),
  );
}

/** Seeds a resource through the API (`POST path` must answer 201). */
export async function seed(apiUrl: string, token: string, path: string, body: unknown): Promise<{ id: string }> {
  const res = await fetch(`${apiUrl}${path}`, { method: 'POST', headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' }, body: JSON.stringify(body) });
  const text = await res.text();
  if (res.status !== 201) throw new Error(`seeding ${path} answered ${res.status}: ${text}`);
  return JSON.parse(text) as { id: string };
}

export interface BatchRun {
  id: string;
  /** Wall clock (Date.now()) just before the POST. */
  submittedAt: number;
  /** ms the POST took (validate, record, addBulk) until its 202. */
  intakeMs: number;
  /** The batch's finished_at, written by the same script that records its last job's final status. */
  finishedAt: number;
  counts: Record<string, number>;
  /** Polls made (each one GET of the batch resource through the API). */
  polls: number;
}

/**
 * Submits a batch through the API and waits for it to complete. The end is the batch's own finished_at (set
 * atomically with the last job's final status), so the poll interval only delays noticing it, not the figure.
 */
export async function runBatch(apiUrl: string, token: string, items: unknown[], pollMs = 250, timeoutMs = 1_800_000): Promise<BatchRun> {
  const headers = { authorization: `Bearer ${token}`, 'content-type': 'application/json' };
  const submittedAt = Date.now();
  const t0 = performance.now();
  const res = await fetch(`${apiUrl}/api/v1/cckm/aws/upload-key/batch`, { method: 'POST', headers, body: JSON.stringify({ items }) });
  const text = await res.text();
  const intakeMs = performance.now() - t0;
  if (res.status !== 202) throw new Error(`batch answered ${res.status}: ${text.slice(0, 500)}`);
  const id = (JSON.parse(text) as { id: string }).id;
  let polls = 0;
  for (const deadline = Date.now() + timeoutMs; ; ) {
    await new Promise((r) => setTimeout(r, pollMs));
    polls++;
    const b = (await (await fetch(`${apiUrl}/api/v1/batches/${id}`, { headers })).json()) as { status: string; finished_at: string | null; counts: Record<string, number> };
    if (b.status === 'completed') return { id, submittedAt, intakeMs, finishedAt: Date.parse(b.finished_at as string), counts: b.counts, polls };
    if (Date.now() > deadline) throw new Error(`batch ${id} did not complete within ${timeoutMs} ms: ${JSON.stringify(b.counts)}`);
  }
}

/** Every job resource of a batch, paging through GET /api/v1/batches/{id}/jobs. */
export async function batchJobs(apiUrl: string, token: string, id: string): Promise<{ id: string; status: string; attempts: number; batch_index: number; finished_at: string | null; error: { code: string } | null }[]> {
  const jobs = [];
  let cursor: string | null = '0';
  while (cursor !== null) {
    const res = await fetch(`${apiUrl}/api/v1/batches/${id}/jobs?limit=1000&cursor=${cursor}`, { headers: { authorization: `Bearer ${token}` } });
    const page = (await res.json()) as { jobs: Awaited<ReturnType<typeof batchJobs>>; next_cursor: string | null };
    jobs.push(...page.jobs);
    cursor = page.next_cursor;
  }
  return jobs;
}

/** The median of a non-empty list (the mean of the middle two when its length is even). */
/** A percentile of samples sorted ascending (nearest rank: the smallest at or above the fraction q of them); NaN when none. */
export function percentile(sorted: number[], q: number): number {
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))] ?? NaN;
}

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? (s[(s.length - 1) / 2] as number) : ((s[s.length / 2 - 1] as number) + (s[s.length / 2] as number)) / 2;
}
