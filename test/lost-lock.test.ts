import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { FaultPoint } from '../worker/fault-point.js';
import { Keyspace } from '../shared/stores/keyspace.js';
import { TAKEN_OVER } from '../worker/runner.js';
import type { Child } from './helpers/child.js';
import { CrashFixture, stopped } from './helpers/crash.js';
import { waitForJob } from './helpers/stack.js';

let f: CrashFixture;
let keyspace: Keyspace;

beforeAll(async () => {
  f = await CrashFixture.start('lost-lock');
  keyspace = new Keyspace(f.stack.config.KEYFERRY_PREFIX);
});
afterAll(async () => {
  await f?.close();
});

/**
 * A job whose real worker process stops itself (SIGSTOP) at `point`, as a frozen process would: its BullMQ lock
 * expires, and a worker in this process takes the job up and finishes it. Returns the frozen worker (still
 * stopped), the finished job, and its stored record and event count as that worker left them.
 */
async function takenOverWhileFrozen(point: FaultPoint, alias: string) {
  const frozen = f.worker({ KEYFERRY_FAULT_POINT: point, KEYFERRY_FAULT_ACTION: 'stop' });
  const jobId = await f.submit(alias);
  await stopped(frozen.proc.pid as number);
  const worker = await f.stack.startWorker();
  const job = await waitForJob(f.stack, f.token, jobId);
  await worker.close();
  expect(job.status).toBe('succeeded');
  const record = await f.stack.redis.get(keyspace.job(jobId));
  const events = await f.stack.redis.xlen(keyspace.jobEvents(jobId));
  return { frozen, jobId, job, record, events };
}

async function ended(child: Child): Promise<void> {
  child.proc.kill('SIGKILL');
  await child.exited;
}

describe('a worker frozen past its lock: another worker takes the job over, and the frozen one, once it runs again, writes nothing', () => {
  it.each(['after:create_key', 'before:import', 'before:record'] as const)(
    'when a worker freezes at %s until the job succeeded elsewhere, then after it wakes the record, the key and the resources stay as the other worker left them',
    async (point) => {
      const alias = `frozen-${point.replace(':', '-')}`;
      const resourcesBefore = await f.uploadedKeyRecords();
      const { frozen, jobId, job, record, events } = await takenOverWhileFrozen(point, alias);
      try {
        frozen.proc.kill('SIGCONT');
        expect(await frozen.waitForLog(TAKEN_OVER)).toMatchObject({ job_id: jobId });
        expect(await f.stack.redis.get(keyspace.job(jobId))).toBe(record);
        expect(await f.stack.redis.xlen(keyspace.jobEvents(jobId))).toBe(events);
        const keys = f.taggedWith(jobId);
        expect(keys.map((k) => [k.keyState, k.arn, k.aliases])).toEqual([['Enabled', job.kms_key_arn, [`alias/${alias}`]]]);
        expect(keys[0]?.material?.equals(f.material)).toBe(true);
        expect(await f.uploadedKeyRecords()).toBe(resourcesBefore + 1);
        f.expectNoOrphanKeys();
      } finally {
        await ended(frozen);
      }
    },
  );

  it('when a worker freezes just before CreateKey and the other worker made its own key meanwhile, then the key the woken one makes is scheduled for deletion', async () => {
    const alias = 'frozen-before-create_key';
    const { frozen, jobId, job, record } = await takenOverWhileFrozen('before:create_key', alias);
    try {
      // Woken, it sends its CreateKey (the intent was recorded before it froze): a second key with the job's tag.
      frozen.proc.kill('SIGCONT');
      await frozen.waitForLog(TAKEN_OVER);
      const dropped = await frozen.waitForLog('scheduled deletion of the key this run made: the job goes on with another');
      expect(await f.stack.redis.get(keyspace.job(jobId))).toBe(record);
      const states = Object.fromEntries(f.taggedWith(jobId).map((k) => [k.keyId, [k.keyState, k.aliases]]));
      expect(dropped.kms_key_id).not.toBe(job.result.aws_param.KeyID);
      expect(states).toEqual({ [job.result.aws_param.KeyID]: ['Enabled', [`alias/${alias}`]], [dropped.kms_key_id as string]: ['PendingDeletion', []] });
      f.expectNoOrphanKeys();
    } finally {
      await ended(frozen);
    }
  });
});
