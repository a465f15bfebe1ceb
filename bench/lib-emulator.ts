/** Starts the KMS emulator in a child process (bench/lib-emulator-child.ts) and reads its counters over IPC. */
import { fork, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import type { KmsEmulatorOptions } from '../test/kms-emulator/emulator.js';

export interface EmulatorStats {
  calls: Record<string, number>;
  throttles: Record<string, number>;
  totalCalls: number;
  totalThrottles: number;
}

export type EmulatorMessage = { type: 'ready'; url: string } | { type: 'stats'; stats: EmulatorStats };

export interface EmulatorProcess {
  url: string;
  pid: number;
  stats(ops: readonly string[]): Promise<EmulatorStats>;
  close(): Promise<void>;
}

export async function startEmulatorProcess(opts: KmsEmulatorOptions): Promise<EmulatorProcess> {
  const proc: ChildProcess = fork(fileURLToPath(new URL('./lib-emulator-child.ts', import.meta.url)), [], {
    execArgv: ['--import', 'tsx'],
    env: { PATH: process.env.PATH ?? '', BENCH_EMULATOR_OPTIONS: JSON.stringify(opts) },
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
  });
  const kill = () => proc.kill('SIGKILL');
  process.once('exit', kill);
  const next = <T extends EmulatorMessage['type']>(type: T) =>
    new Promise<Extract<EmulatorMessage, { type: T }>>((resolve, reject) => {
      const onMessage = (msg: EmulatorMessage) => {
        if (msg.type !== type) return;
        proc.off('message', onMessage);
        proc.off('exit', onExit);
        resolve(msg as Extract<EmulatorMessage, { type: T }>);
      };
      const onExit = (code: number | null) => reject(new Error(`the emulator process exited (${code}) before answering ${type}`));
      proc.on('message', onMessage);
      proc.once('exit', onExit);
    });
  const { url } = await next('ready');
  return {
    url,
    pid: proc.pid as number,
    async stats(ops) {
      const answer = next('stats');
      proc.send({ type: 'stats', ops });
      return (await answer).stats;
    },
    async close() {
      process.off('exit', kill);
      if (proc.exitCode !== null || proc.signalCode !== null) return;
      const exited = new Promise((resolve) => proc.once('exit', resolve));
      proc.send({ type: 'close' });
      await exited;
    },
  };
}
