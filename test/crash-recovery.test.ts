import { randomBytes } from 'node:crypto';
import { CreateKeyCommand, KMSClient } from '@aws-sdk/client-kms';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FAULT_POINTS, type FaultPoint } from '../worker/fault-point.js';
import { Keyspace } from '../shared/stores/keyspace.js';
import { JOB_TAG_KEY } from '../worker/result.js';
import { readFileSync } from 'node:fs';
import { TAKEN_OVER } from '../worker/runner.js';
import { runEntry, type Child } from './helpers/child.js';
import { EMULATOR_ACCESS_KEY, EMULATOR_SECRET_KEY, seedKms, seedLocalKey, startStack, waitForJob, type TestStack } from './helpers/stack.js';

// Short locks, so that a job whose worker died is taken up again within about 1.5 s.
const LOCK_MS = 1000;
const STALLED_INTERVAL_MS = 500;
const LOCK_ENV = { WORKER_LOCK_DURATION_MS: String(LOCK_MS), WORKER_STALLED_INTERVAL_MS: String(STALLED_INTERVAL_MS) };

let stack: TestStack;
let token: string;
let kms: KMSClient;
let childEnv: Record<string, string>;
const children: Child[] = [];
const material = randomBytes(32);
/** Keys made directly in the emulator, not by a job: the tag lookup must page past them and leave them alone. */
const bystanders = new Set<string>();
/** Every job this file submitted: each emulator key but the bystanders must belong to one of them. */
const jobIds: string[] = [];

async function submit(alias: string, source = 'crash-source'): Promise<string> {
  const res = await stack.call('POST', '/api/v1/cckm/aws/upload-key', {
    token,
    body: { source_key_identifier: source, region: 'ap-south-1', kms: 'kms', aws_param: { Alias: alias, Tags: [{ TagKey: 'team', TagValue: 'crash' }] } },
  });
  expect(res.status).toBe(202);
  jobIds.push(res.body.id);
  return res.body.id as string;
}

/**
 * Submits a job to the real worker process (worker/main.ts, on the stack's Redis prefix) armed with a fault
 * point, and resolves once that process is dead. One that never reaches its point is stopped after 20 s.
 */
async function jobWhoseWorkerDies(point: FaultPoint, alias: string, source?: string): Promise<string> {
  const child = runEntry('worker/main.ts', { ...childEnv, KEYFERRY_FAULT_POINT: point });
  children.push(child);
  const jobId = await submit(alias, source);
  const timer = setTimeout(() => child.proc.kill('SIGTERM'), 20_000);
  const { signal } = await child.exited;
  clearTimeout(timer);
  expect(signal, `the worker did not die at ${point}:\n${child.output.slice(-20).join('\n')}`).toBe('SIGKILL');
  return jobId;
}

const taggedWith = (jobId: string) => stack.emulator.keys().filter((k) => k.tags.some((t) => t.TagKey === JOB_TAG_KEY && t.TagValue === jobId));

function expectNoOrphanKeys() {
  for (const key of stack.emulator.keys()) {
    if (bystanders.has(key.keyId)) continue;
    const owner = key.tags.find((t) => t.TagKey === JOB_TAG_KEY)?.TagValue;
    expect(jobIds, `key ${key.keyId} belongs to no job`).toContain(owner);
  }
}

async function uploadedKeyRecords(): Promise<number> {
  let count = 0;
  let cursor = '0';
  do {
    const [next, keys] = await stack.redis.scan(cursor, 'MATCH', `${stack.config.KEYFERRY_PREFIX}:key:*`, 'COUNT', 1000);
    cursor = next;
    count += keys.length;
  } while (cursor !== '0');
  return count;
}

beforeAll(async () => {
  stack = await startStack({ name: 'crash', worker: false, env: LOCK_ENV });
  token = await stack.token('crash');
  await seedKms(stack, token);
  await seedLocalKey(stack, token, 'crash-source', material.toString('hex'));
  childEnv = stack.childEnv();
  kms = new KMSClient({ region: 'ap-south-1', endpoint: stack.emulator.url, credentials: { accessKeyId: EMULATOR_ACCESS_KEY, secretAccessKey: EMULATOR_SECRET_KEY }, maxAttempts: 1 });
  // More keys than one ListKeys page (100), some tagged by another keyferry job.
  for (let i = 0; i < 150; i++) {
    const tags = i % 3 === 0 ? [{ TagKey: JOB_TAG_KEY, TagValue: `someone-elses-job-${i}` }] : [];
    const out = await kms.send(new CreateKeyCommand({ Origin: 'EXTERNAL', Tags: tags }));
    bystanders.add(out.KeyMetadata?.KeyId as string);
  }
});
afterAll(async () => {
  for (const child of children) child.proc.kill('SIGKILL');
  kms?.destroy();
  await stack?.close();
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
    const keys = taggedWith(jobId);
    expect(keys).toHaveLength(1);
    const [key] = keys;
    expect(key).toMatchObject({ keyState: 'Enabled', arn: job.kms_key_arn, aliases: [`alias/crash-${point.replace(':', '-')}`] });
    expect(key?.material?.equals(material)).toBe(true);
    expect(job.result.aws_param).toMatchObject({ KeyID: key?.keyId, Tags: [{ TagKey: 'team', TagValue: 'crash' }] });
    // The tag lookup runs only when CreateKey may have run unrecorded: always when the worker died before the key's
    // checkpoint was sent, never once the import began (that checkpoint was answered before it). In between
    // (CreateAlias and GetParametersForImport go while it is on its way) either is right.
    const lookedUp = stack.emulator.callCount('ListKeys') > listKeysBefore;
    if (point === 'before:create_key' || point === 'after:create_key') expect(lookedUp).toBe(true);
    if (['before:import', 'after:import', 'before:record', 'after:record'].includes(point)) expect(lookedUp).toBe(false);
    expect(await uploadedKeyRecords()).toBe(jobIds.length);
    expectNoOrphanKeys();
    expect(recoveryMs).toBeLessThan(LOCK_MS + STALLED_INTERVAL_MS + 3000);
  });

  it('when two keys carry the job tag after a crash, then the oldest is adopted and the other scheduled for deletion, skipping keys that deny reading their tags', async () => {
    const jobId = await jobWhoseWorkerDies('after:create_key', 'crash-twice');
    const [first] = taggedWith(jobId);
    // A second attempt that raced the first one left another key with the same tag.
    await kms.send(new CreateKeyCommand({ Origin: 'EXTERNAL', Tags: [{ TagKey: JOB_TAG_KEY, TagValue: jobId }] }));
    // The lookup reads the bystanders' tags first; some of them deny it.
    stack.emulator.injectFault({ op: 'ListResourceTags', error: 'AccessDeniedException', count: 3 });

    const worker = await stack.startWorker();
    const job = await waitForJob(stack, token, jobId);
    await worker.close();

    expect(job.status).toBe('succeeded');
    const states = Object.fromEntries(taggedWith(jobId).map((k) => [k.keyId, k.keyState]));
    expect(Object.values(states).sort()).toEqual(['Enabled', 'PendingDeletion']);
    expect(states[first?.keyId as string]).toBe('Enabled');
    expect(job.result.aws_param.KeyID).toBe(first?.keyId);
    expectNoOrphanKeys();
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
      expect(taggedWith(jobId).map((k) => [k.keyState, k.aliases])).toEqual([['PendingDeletion', []]]);
      expectNoOrphanKeys();
    },
  );

  it('when workers die running a job more than WORKER_MAX_STALLED_COUNT times, then it fails worker_lost and the key it made is scheduled for deletion', async () => {
    const jobId = await jobWhoseWorkerDies('after:create_key', 'crash-for-good');

    const worker = await stack.startWorker({ WORKER_MAX_STALLED_COUNT: '0' });
    const job = await waitForJob(stack, token, jobId);
    await worker.close();

    expect(job).toMatchObject({ status: 'failed', error: { code: 'worker_lost', retryable: false }, deletion_scheduled_for: expect.any(String) });
    expect(taggedWith(jobId).map((k) => k.keyState)).toEqual(['PendingDeletion']);
    expectNoOrphanKeys();
  });
});

/** Resolves once process `pid` is stopped (state T in /proc/<pid>/stat); rejects after `timeoutMs`. */
async function stopped(pid: number, timeoutMs = 20_000): Promise<void> {
  for (const end = Date.now() + timeoutMs; Date.now() < end; await new Promise((r) => setTimeout(r, 20))) {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    if (stat.slice(stat.lastIndexOf(')') + 2).startsWith('T')) return;
  }
  throw new Error(`process ${pid} did not stop within ${timeoutMs} ms`);
}

describe('a worker frozen past its lock: another worker takes the job over, and the frozen one, once it runs again, writes nothing', () => {
  it.each(['after:create_key', 'before:import', 'before:record'] as const)(
    'when a worker freezes at %s until the job succeeded elsewhere, then after it wakes the record, the key and the resources stay as the other worker left them',
    async (point) => {
      const alias = `frozen-${point.replace(':', '-')}`;
      const frozen = runEntry('worker/main.ts', { ...childEnv, KEYFERRY_FAULT_POINT: point, KEYFERRY_FAULT_ACTION: 'stop' });
      children.push(frozen);
      try {
        const resourcesBefore = await uploadedKeyRecords();
        const jobId = await submit(alias);
        await stopped(frozen.proc.pid as number);

        const worker = await stack.startWorker();
        const job = await waitForJob(stack, token, jobId);
        await worker.close();
        expect(job.status).toBe('succeeded');
        const keyspace = new Keyspace(stack.config.KEYFERRY_PREFIX);
        const record = await stack.redis.get(keyspace.job(jobId));
        const events = await stack.redis.xlen(keyspace.jobEvents(jobId));

        frozen.proc.kill('SIGCONT');
        const said = await frozen.waitForLog(TAKEN_OVER);
        expect(said).toMatchObject({ job_id: jobId });
        expect(await stack.redis.get(keyspace.job(jobId))).toBe(record);
        expect(await stack.redis.xlen(keyspace.jobEvents(jobId))).toBe(events);
        const keys = taggedWith(jobId);
        expect(keys.map((k) => [k.keyState, k.arn, k.aliases])).toEqual([['Enabled', job.kms_key_arn, [`alias/${alias}`]]]);
        expect(keys[0]?.material?.equals(material)).toBe(true);
        expect(await uploadedKeyRecords()).toBe(resourcesBefore + 1);
        expectNoOrphanKeys();
      } finally {
        frozen.proc.kill('SIGKILL');
        await frozen.exited;
      }
    },
  );
});
