import { spawn, type ChildProcess } from 'node:child_process';

export interface Child {
  proc: ChildProcess;
  output: string[];
  /** Resolves with the first log line whose `msg` is `msg`. */
  waitForLog(msg: string, timeoutMs?: number): Promise<Record<string, unknown>>;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

/** Runs a TypeScript entry point (api/main.ts, worker/main.ts) as a real child process with its own env. */
export function runEntry(entry: string, env: Record<string, string>, args: string[] = []): Child {
  const proc = spawn(process.execPath, ['--import', 'tsx', entry, ...args], {
    env: { PATH: process.env.PATH ?? '', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const output: string[] = [];
  const waiters: { msg: string; resolve: (v: Record<string, unknown>) => void }[] = [];
  const onData = (chunk: Buffer) => {
    for (const line of chunk.toString('utf8').split('\n').filter(Boolean)) {
      output.push(line);
      let parsed: Record<string, unknown> | undefined;
      try {
        parsed = JSON.parse(line) as Record<string, unknown>;
      } catch {
        continue;
      }
      for (const w of waiters.filter((x) => x.msg === parsed?.msg)) {
        waiters.splice(waiters.indexOf(w), 1);
        w.resolve(parsed);
      }
    }
  };
  proc.stdout?.on('data', onData);
  proc.stderr?.on('data', onData);
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => proc.on('exit', (code, signal) => resolve({ code, signal })));
  return {
    proc,
    output,
    exited,
    waitForLog: (msg, timeoutMs = 15_000) =>
      new Promise((resolve, reject) => {
        const seen = output.map((l) => { try { return JSON.parse(l) as Record<string, unknown>; } catch { return undefined; } }).find((p) => p?.msg === msg);
        if (seen) return resolve(seen);
        const timer = setTimeout(() => reject(new Error(`no "${msg}" log line within ${timeoutMs} ms:\n${output.join('\n')}`)), timeoutMs);
        waiters.push({ msg, resolve: (v) => { clearTimeout(timer); resolve(v); } });
      }),
  };
}
