/**
 * Crash injection, for tests only (test/crash-recovery.test.ts). When the environment variable
 * KEYFERRY_FAULT_POINT names one of the points below, the worker process kills itself with SIGKILL on
 * reaching it, as a crash or an OOM kill would: no cleanup, no lock released. `before:<step>` is just
 * before the step's side effect: for create_key and record, once the last checkpoint before it was answered;
 * for the requests that are safe to repeat (create_alias, get_import_params, import), while that checkpoint
 * (and, for an HSM or KMIP source, the write entering `import`) may still be on its way, as the request goes
 * with it. `after:<step>` is just after the side effect, before the checkpoint that records it; `after:record`
 * is after the write that stores the key resource and the success together (on a Redis Cluster, after the
 * resource's SET and then the record's), before BullMQ hears of it. With KEYFERRY_FAULT_ACTION=stop, the
 * process stops itself with SIGSTOP there instead, as a frozen process (a long pause of its VM, say) would,
 * until a SIGCONT: its BullMQ lock expires meanwhile and another worker takes the job over. Read once at load;
 * unset (as in production) the points do nothing. Deliberately not part of the config schema: it is not a
 * setting.
 */
const STEPS_WITH_SIDE_EFFECTS = ['create_key', 'create_alias', 'get_import_params', 'import', 'record'] as const;

export const FAULT_POINTS = STEPS_WITH_SIDE_EFFECTS.flatMap((s) => [`before:${s}`, `after:${s}`] as const);
export type FaultPoint = (typeof FAULT_POINTS)[number];

const armed = process.env.KEYFERRY_FAULT_POINT;
const signal = process.env.KEYFERRY_FAULT_ACTION === 'stop' ? 'SIGSTOP' : 'SIGKILL';

export function faultPoint(point: FaultPoint): void {
  if (point === armed) process.kill(process.pid, signal);
}
