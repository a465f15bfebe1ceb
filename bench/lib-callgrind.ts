/**
 * A Node entry point run as a process of its own under `valgrind --tool=callgrind`, for the instruction-count
 * benchmarks (bench/intake-instructions.ts, bench/pipeline-instructions.ts). Node runs with `--single-threaded`
 * (no helper threads: the JIT compiler and the garbage collector work on the counted thread, and callgrind
 * counts them too) and one libuv thread. Counting starts off; `count(true)` / `count(false)` switch it
 * (`callgrind_control -i`), and `stop` ends the process and returns what was counted (user space: the kernel's
 * part of the socket calls is not counted).
 */
import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import type { Writable } from 'node:stream';

/** Exits the benchmark with a clear message when valgrind is not installed. */
export function requireValgrind(benchmark: string): void {
  if (spawnSync('valgrind', ['--version']).status !== 0) {
    console.error(`${benchmark} needs valgrind (apt-get install valgrind)`);
    process.exit(1);
  }
}

export interface CountedProcess {
  /** Lines the process printed so far (stdout and stderr). */
  lines: string[];
  pid: number;
  stdin: Writable;
  /** Rejects if the process exits before `stop`. */
  exited: Promise<never>;
  count(on: boolean): void;
  /**
   * Ends the process (SIGTERM, unless it was told to exit some other way: `signal` false) and returns the
   * instructions counted; fails if it has not exited within a minute or nothing was counted.
   */
  stop(signal?: boolean): Promise<number>;
  kill(): Promise<void>;
}

/** Starts `node --single-threaded --import tsx <entry…>` under callgrind with counting off. */
export function startCounted(entry: string[], env: Record<string, string>): CountedProcess {
  // %p: each process valgrind runs writes a file of its own (a forked helper must not overwrite the server's).
  const outPattern = join(tmpdir(), `keyferry-callgrind-${randomBytes(4).toString('hex')}.%p.out`);
  const childEnv = { PATH: process.env.PATH ?? '', ...env, UV_THREADPOOL_SIZE: '1' };
  const child = spawn('valgrind', ['--tool=callgrind', '--instr-atstart=no', `--callgrind-out-file=${outPattern}`, process.execPath, '--single-threaded', '--import', 'tsx', ...entry], {
    env: childEnv,
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  const lines: string[] = [];
  createInterface({ input: child.stdout }).on('line', (l) => lines.push(l));
  createInterface({ input: child.stderr }).on('line', (l) => lines.push(l));
  let stopping = false;
  const ended = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  const exited = new Promise<never>((_, reject) => {
    void ended.then((code) => {
      if (!stopping) reject(new Error(`${entry.join(' ')} exited (${code}) too early:\n${lines.slice(-40).join('\n')}`));
    });
  });
  // Handled by whoever races it; a caller that never does must not see an unhandled rejection.
  exited.catch(() => undefined);
  const outFile = outPattern.replace('%p', String(child.pid));
  return {
    lines,
    pid: child.pid as number,
    stdin: child.stdin,
    exited,
    count(on) {
      // In the process's environment: valgrind names its vgdb pipe after USER and HOST (keyferry's HOST setting too).
      const r = spawnSync('callgrind_control', ['-i', on ? 'on' : 'off', String(child.pid)], { env: childEnv, timeout: 60_000 });
      if (r.status !== 0) throw new Error(`callgrind_control failed: ${r.stderr.toString()}`);
    },
    async stop(signal = true) {
      stopping = true;
      // The counts are written as the process exits; one that does not stop within a minute fails the run.
      if (signal) child.kill('SIGTERM');
      const stopped = await Promise.race([ended.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 60_000).unref())]);
      if (!stopped) throw new Error(`${entry.join(' ')} did not exit within 60 s`);
      const totals = /^totals: (\d+)$/m.exec(await readFile(outFile, 'utf8'));
      await rm(outFile, { force: true });
      // Zero: callgrind_control reached no process (it still exits 0), so nothing was counted.
      if (!totals || Number(totals[1]) === 0) throw new Error(`callgrind counted nothing for ${entry.join(' ')}`);
      return Number(totals[1]);
    },
    async kill() {
      stopping = true;
      child.kill('SIGKILL');
      await rm(outFile, { force: true });
    },
  };
}

/** Waits for a line matching `re` among those the process printed so far or prints later. */
export async function lineMatching(lines: string[], re: RegExp, timeoutMs = 120_000): Promise<RegExpExecArray> {
  for (const deadline = Date.now() + timeoutMs; Date.now() < deadline; ) {
    for (const l of lines) {
      const m = re.exec(l);
      if (m) return m;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`no line matching ${re} within ${timeoutMs} ms:\n${lines.join('\n')}`);
}
