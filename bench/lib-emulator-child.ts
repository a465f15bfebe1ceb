/**
 * The KMS emulator (test/kms-emulator) in a process of its own, for benchmarks that must not share a CPU
 * with it (see startEmulatorProcess in bench/lib-emulator.ts). Options come as JSON in BENCH_EMULATOR_OPTIONS;
 * it answers `{type: 'stats'}` messages on its IPC channel with its request and throttle counters.
 */
import { KmsEmulator, type KmsEmulatorOptions } from '../test/kms-emulator/emulator.js';
import type { EmulatorMessage, EmulatorStats } from './lib-emulator.js';

const send = (msg: EmulatorMessage) => process.send?.(msg);
const opts = JSON.parse(process.env.BENCH_EMULATOR_OPTIONS ?? '{}') as KmsEmulatorOptions;
const emulator = new KmsEmulator(opts);
const url = await emulator.start();

function stats(ops: string[]): EmulatorStats {
  return {
    calls: Object.fromEntries(ops.map((op) => [op, emulator.callCount(op)])),
    throttles: Object.fromEntries(ops.map((op) => [op, emulator.throttledCount(op)])),
    totalCalls: emulator.callCount(),
    totalThrottles: emulator.throttledCount(),
  };
}

process.on('message', (msg: { type: string; ops?: string[] }) => {
  if (msg.type === 'stats') send({ type: 'stats', stats: stats(msg.ops ?? []) });
  if (msg.type === 'close') void emulator.close().then(() => process.exit(0));
});
// The parent went away: nothing to serve any more.
process.on('disconnect', () => process.exit(0));
send({ type: 'ready', url });
