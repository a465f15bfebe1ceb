import { randomBytes } from 'node:crypto';
import { CreateKeyCommand, KMSClient } from '@aws-sdk/client-kms';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FAULT_POINTS, type FaultPoint } from '../worker/fault-point.js';
import { Keyspace } from '../shared/stores/keyspace.js';
import { JOB_TAG_KEY } from '../worker/result.js';
import { CrashFixture, LOCK_MS, STALLED_INTERVAL_MS } from './helpers/crash.js';
import { EMULATOR_ACCESS_KEY, EMULATOR_SECRET_KEY, seedLocalKey, waitForJob, type TestStack } from './helpers/stack.js';

let f: CrashFixture;
let stack: TestStack;
let token: string;
let kms: KMSClient;

/**
 * Submits a job to the real worker process (worker/main.ts, on the stack's Redis prefix) armed with a fault
 * point, and resolves once that process is dead. One that never reaches its point is stopped after 20 s.
 */
async function jobWhoseWorkerDies(point: FaultPoint, alias: string, source?: string): Promise<string> {
  const child = f.worker({ KEYFERRY_FAULT_POINT: point });
  const jobId = await f.submit(alias, source);
  const timer = setTimeout(() => child.proc.kill('SIGTERM'), 20_000);
  const { signal } = await child.exited;
  clearTimeout(timer);
  expect(signal, `the worker did not die at ${point}:\n${child.output.slice(-20).join('\n')}`).toBe('SIGKILL');
  return jobId;
}

beforeAll(async () => {
  f = await CrashFixture.start('crash');
  ({ stack, token } = f);
  kms = new KMSClient({ region: 'ap-south-1', endpoint: stack.emulator.url, credentials: { accessKeyId: EMULATOR_ACCESS_KEY, secretAccessKey: EMULATOR_SECRET_KEY }, maxAttempts: 1 });
  // More keys than one ListKeys page (100), some tagged by another keyferry job: the tag lookup must page past
  // them and leave them alone.
  for (let i = 0; i < 150; i++) {
    const tags = i % 3 === 0 ? [{ TagKey: JOB_TAG_KEY, TagValue: `someone-elses-job-${i}` }] : [];
    const out = await kms.send(new CreateKeyCommand({ Origin: 'EXTERNAL', Tags: tags }));
    f.bystanders.add(out.KeyMetadata?.KeyId as string);
  }
});
afterAll(async () => {
  kms?.destroy();
  await f?.close();
});

describe('crash recovery: the real worker process is killed at each side effect, and another worker finishes the job', () => {
  it.each(FAULT_POINTS)('when the worker is killed at %s, then the job succeeds with exactly one Enabled key holding the source material', async (point) => {
    const listKeysBefore = stack.emulator.callCount('ListKeys');
    const jobId = await jobWhoseWorkerDies(point, `crash-${point.replace(':', '-')}`);
    const diedAt = Date.now();

    const worker = await stack.startWorker();
    const job = await waitForJob(stack, token, jobId);
    const recoveryMs = Date.now() - diedAt;
    await worker.close();

    expect(job.status).toBe('succeeded');
    const keys = f.taggedWith(jobId);
    expect(keys).toHaveLength(1);
    const [key] = keys;
    expect(key).toMatchObject({ keyState: 'Enabled', arn: job.kms_key_arn, aliases: [`alias/crash-${point.replace(':', '-')}`] });
    expect(key?.material?.equals(f.material)).toBe(true);
    expect(job.result.aws_param).toMatchObject({ KeyID: key?.keyId, Tags: [{ TagKey: 'team', TagValue: 'crash' }] });
    // The tag lookup runs only when CreateKey may have run unrecorded: always when the worker died before the key's
    // checkpoint was sent, never once the import began (that checkpoint was answered before it). In between
    // (CreateAlias and GetParametersForImport go while it is on its way) either is right.
    const lookedUp = stack.emulator.callCount('ListKeys') > listKeysBefore;
    if (point === 'before:create_key' || point === 'after:create_key') expect(lookedUp).toBe(true);
    if (['before:import', 'after:import', 'before:record', 'after:record'].includes(point)) expect(lookedUp).toBe(false);
    expect(await f.uploadedKeyRecords()).toBe(f.jobIds.length);
    f.expectNoOrphanKeys();
    expect(recoveryMs).toBeLessThan(LOCK_MS + STALLED_INTERVAL_MS + 3000);
  });

  it('when two keys carry the job tag after a crash, then the oldest is adopted and the other scheduled for deletion, skipping keys that deny reading their tags', async () => {
    const jobId = await jobWhoseWorkerDies('after:create_key', 'crash-twice');
    const [first] = f.taggedWith(jobId);
    // A second attempt that raced the first one left another key with the same tag.
    await kms.send(new CreateKeyCommand({ Origin: 'EXTERNAL', Tags: [{ TagKey: JOB_TAG_KEY, TagValue: jobId }] }));
    // The lookup reads the bystanders' tags first; some of them deny it.
    stack.emulator.injectFault({ op: 'ListResourceTags', error: 'AccessDeniedException', count: 3 });

    const worker = await stack.startWorker();
    const job = await waitForJob(stack, token, jobId);
    await worker.close();

    expect(job.status).toBe('succeeded');
    const states = Object.fromEntries(f.taggedWith(jobId).map((k) => [k.keyId, k.keyState]));
    expect(Object.values(states).sort()).toEqual(['Enabled', 'PendingDeletion']);
    expect(states[first?.keyId as string]).toBe('Enabled');
    expect(job.result.aws_param.KeyID).toBe(first?.keyId);
    f.expectNoOrphanKeys();
  });

  it.each(['after:create_key', 'after:create_alias'] as const)(
    'when a worker dies at %s and the source key is gone before the retry, then the job fails at resolve, and the key it made and its alias are found and cleaned up',
    async (point) => {
      const name = `crash-doomed-${point.slice('after:'.length)}`;
      const doomed = await seedLocalKey(stack, token, name, randomBytes(32).toString('hex'));
      const jobId = await jobWhoseWorkerDies(point, name, doomed.name);
      // The local key disappears from the store (there is no delete route): the retry's resolve cannot find it.
      const keyspace = new Keyspace(stack.config.KEYFERRY_PREFIX);
      await stack.redis.hdel(keyspace.resources('crash', 'localkeys'), doomed.id);
      await stack.redis.hdel(keyspace.resourceNames('crash', 'localkeys'), doomed.name);

      const worker = await stack.startWorker();
      const job = await waitForJob(stack, token, jobId);
      await worker.close();

      // after:create_key: the earlier attempt's intent was kept (this attempt's start write did not record it), so
      // the clean-up found the key by its tag. after:create_alias: the record had the key, or only the intent (the
      // key's checkpoint goes with CreateAlias), but not the alias: the clean-up looked for it all the same.
      expect(job).toMatchObject({ status: 'failed', step: 'resolve', error: { code: 'source_key_not_found' }, deletion_scheduled_for: expect.any(String) });
      expect(f.taggedWith(jobId).map((k) => [k.keyState, k.aliases])).toEqual([['PendingDeletion', []]]);
      f.expectNoOrphanKeys();
    },
  );

  it('when workers die running a job more than WORKER_MAX_STALLED_COUNT times, then it fails worker_lost and the key it made is scheduled for deletion', async () => {
    const jobId = await jobWhoseWorkerDies('after:create_key', 'crash-for-good');

    const worker = await stack.startWorker({ WORKER_MAX_STALLED_COUNT: '0' });
    const job = await waitForJob(stack, token, jobId);
    await worker.close();

    expect(job).toMatchObject({ status: 'failed', error: { code: 'worker_lost', retryable: false }, deletion_scheduled_for: expect.any(String) });
    expect(f.taggedWith(jobId).map((k) => k.keyState)).toEqual(['PendingDeletion']);
    f.expectNoOrphanKeys();
  });
});
