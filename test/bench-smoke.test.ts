import { describe, expect, it } from 'vitest';
import { runEntry } from './helpers/child.js';

const REDIS_URL = process.env.TEST_REDIS_URL ?? 'redis://127.0.0.1:6379';

// The benchmarks run by hand with real sizes; here each runs once with tiny sizes so they never rot. The
// pipeline, quota and worker-cost benchmarks start a redis-server of their own (REDIS_URL is not used).
const cases: { script: string; args?: string[]; env?: Record<string, string>; figures: RegExp[]; check?: (output: string) => void; timeoutMs?: number }[] = [
  { script: 'bench/batch-intake.ts', args: ['--items', '10', '--runs', '1'], figures: [/ratio keyferry \/ raw addBulk: \d/] },
  { script: 'bench/memory.ts', args: ['--jobs', '5'], figures: [/bytes per finished job/] },
  {
    script: 'bench/intake.ts',
    args: ['--duration', '1', '--connections', '2', '--rounds', '1'],
    figures: [
      /^\| round 1: keyferry POST …\/upload-key, full load \| \d+ \| \d+ \| \d+ \| \d+ \| [\d.]+ \|$/m,
      /ratio keyferry \/ bare express \(requests\/s\), median of 1 rounds: \d/,
      /ratio \(bare express \+ Redis calls\) \/ bare express, median of 1 rounds: \d/,
      /^\| keyferry POST …\/upload-key, half load \(\d+ req\/s; paced evenly\) \| \d+ \| [\d.]+ \| [\d.]+ \| \d+ \| {2}\|$/m,
      /^\| bare Express 5 JSON endpoint at the same rate, paced evenly \| \d+ \| [\d.]+ \| [\d.]+ \| \d+ \| {2}\|$/m,
      /^p99 at half load, paced evenly: [\d.]+ ms \(goal under 25 ms: (met|missed)\)$/m,
    ],
  },
  {
    // Both servers run under valgrind (tens of times slower than natively): a handful of requests.
    script: 'bench/intake-instructions.ts',
    args: ['--requests', '5', '--warmup', '10'],
    figures: [
      /^\| bare Express 5 JSON endpoint \(express\.json, 202\) \| \d+\.\d \|$/m,
      /^\| keyferry POST …\/upload-key \(logging silent\) \| \d+\.\d \|$/m,
      /^ratio bare \/ keyferry instructions per request: \d+\.\d{3}$/m,
    ],
    timeoutMs: 120_000,
  },
  {
    // Both senders run under valgrind: a handful of uploads.
    script: 'bench/pipeline-instructions.ts',
    args: ['--uploads', '4', '--warmup', '4', '--concurrency', '2'],
    figures: [
      /^\| bare @aws-sdk\/client-kms sequence \| \d+\.\d\d \|$/m,
      /^\| keyferry worker \(BullMQ job, records, KMS requests; KMS quotas off, LOG_LEVEL=info\) \| \d+\.\d\d \|$/m,
      /^ratio bare \/ keyferry instructions per upload: \d+\.\d{3} \(pipeline goal, if both were CPU-bound on a steady machine: ≥ 0\.8: (met|NOT met)\)$/m,
    ],
    timeoutMs: 180_000,
  },
  { script: 'bench/api-cpu.ts', args: ['--requests', '200', '--rounds', '1'], figures: [/ratio bare \/ keyferry CPU per request: \d/, /ratio bare \/ \(bare \+ Redis calls\) CPU per request: \d/] },
  {
    script: 'bench/pipeline.ts',
    env: { BENCH_N: '16', BENCH_ROUNDS: '1', BENCH_WARMUP: '4', BENCH_CONCURRENCY: '4', BENCH_PREFETCH: '2' },
    figures: [
      /^machine: \d+ × .+, node v\d+/m,
      /= 4 uploads in flight on both sides \(keyferry's workers hold 2 job\(s\) each ahead of those, WORKER_PREFETCH\)/m,
      // wall s, uploads/s, KMS requests, CPU ms, then busy % and waiting for a CPU %, each side.
      /^\| 1 \| bare SDK sequence \(sender: this process\) \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| \d+ \| \d+ \|/m,
      /^\| 1 \| keyferry \(sender: 1 worker process\(es\)\) \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| \d+ \| \d+ \|/m,
      /^\| create_key \| [\d.]+ \|$/m,
      /^ratio over all rounds \(uploads of all rounds \/ their total time\): \d\.\d{3}$/m,
      /^ratio keyferry \/ bare sequence \(uploads\/s\): \d+\.\d\d/m,
      /^goal keyferry ≥ 80% of the bare sequence: (met|NOT met)$/m,
    ],
    // The bare sequence must keep sending what keyferry's pipeline sends: as many KMS requests per upload.
    check: (output) => {
      const perUpload = (what: string) => new RegExp(`^\\| 1 \\| ${what} [^|]*\\| [\\d.]+ \\| [\\d.]+ \\| ([\\d.]+) \\|`, 'm').exec(output)?.[1];
      expect(perUpload('bare SDK sequence')).toBeDefined();
      expect(perUpload('bare SDK sequence')).toBe(perUpload('keyferry'));
    },
  },
  {
    // Each phase's sender on a CPU of its own (taskset).
    script: 'bench/pipeline.ts',
    args: ['--pin'],
    env: { BENCH_N: '8', BENCH_ROUNDS: '1', BENCH_WARMUP: '2', BENCH_CONCURRENCY: '2' },
    figures: [/; pinned: the sender on CPU 0, everything else on CPU 1$/m, /^ratio over all rounds \(uploads of all rounds \/ their total time\): \d\.\d{3}$/m],
  },
  {
    script: 'bench/quota.ts',
    env: { BENCH_JOBS: '4', BENCH_BUCKETS: '2', BENCH_QUOTA_SCALE: '10', BENCH_WORKERS: '1' },
    figures: [
      /^machine: \d+ × .+, node v\d+/m,
      /^\| 111111111111\/eu-west-1 \| 10 \| [\d.]+ \| [\d.]+ \|/m,
      /^\| 222222222222\/us-east-1 \| 10 \| [\d.]+ \| [\d.]+ \|/m,
      /^\| keyferry \(batch, quota slots in Redis\) \| 8 \| \d+ \| \d+ \| \d+ \|/m,
      /^\| naive Promise\.all, SDK standard retries \(3 attempts\) \| 8 \| \d+ \| \d+ \| \d+ \|/m,
      /^keyferry uploads\/s ÷ quota, worst account\/region: \d\.\d{3}; failed jobs: \d+/m,
      /^goal ≥ 95% of quota on every account\/region with zero failed jobs: (met|NOT met)$/m,
    ],
  },
  {
    script: 'bench/worker-cost.ts',
    env: { BENCH_N: '12', BENCH_WARMUP: '2', BENCH_METERED: '1' },
    figures: [
      /^machine: \d+ × .+, node v\d+/m,
      /^worker cost: 12 uploads in one batch, KMS quotas metered \(never binding\),/m,
      /^\| 12 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \/ [\d.]+ \| [\d.]+ \|/m,
      /^\| (eval|evalsha|get|set|persist) \| [\d.]+ \| [\d.]+% \|$/m,
      /^Redis commands per upload: [\d.]+; worker CPU ms per upload: [\d.]+; worker peak RSS MB: [\d.]+/m,
    ],
  },
];

describe('benchmark scripts', () => {
  for (const { script, args = [], env = {}, figures, check, timeoutMs = 30_000 } of cases) {
    it(`when ${[script, ...args].join(' ')} runs with tiny sizes, then it prints its figures and exits 0`, async () => {
      const child = runEntry(script, { REDIS_URL, ...env }, args);
      const exited = await child.exited;
      const output = child.output.join('\n');
      expect(exited, output).toEqual({ code: 0, signal: null });
      for (const figure of figures) expect(output).toMatch(figure);
      check?.(output);
    }, timeoutMs);
  }
});
