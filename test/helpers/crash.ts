import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { expect } from 'vitest';
import { JOB_TAG_KEY } from '../../worker/result.js';
import { runEntry, type Child } from './child.js';
import { seedKms, seedLocalKey, startStack, type TestStack } from './stack.js';

// Short locks, so that a job whose worker died (or froze) is taken up again within about 1.5 s.
export const LOCK_MS = 1000;
export const STALLED_INTERVAL_MS = 500;

/** The name of the local-store source key the fixture seeds (with `material`). */
export const SOURCE = 'crash-source';

/**
 * A stack without a worker of its own (workers are started by each test: in this process, or as real child
 * processes armed with a fault point, see worker/fault-point.ts), short BullMQ locks, a KMS connection and a
 * local source key. It keeps the ids of the jobs it submitted, so that every key in the emulator can be
 * checked to belong to one of them (or to be a bystander the test made itself).
 */
export class CrashFixture {
  readonly material = randomBytes(32);
  /** Keys made directly in the emulator, not by a job. */
  readonly bystanders = new Set<string>();
  readonly jobIds: string[] = [];
  readonly children: Child[] = [];

  private constructor(
    readonly stack: TestStack,
    readonly account: string,
    readonly token: string,
  ) {}

  static async start(name: string): Promise<CrashFixture> {
    const stack = await startStack({ name, worker: false, env: { WORKER_LOCK_DURATION_MS: String(LOCK_MS), WORKER_STALLED_INTERVAL_MS: String(STALLED_INTERVAL_MS) } });
    const f = new CrashFixture(stack, name, await stack.token(name));
    await seedKms(stack, f.token);
    await seedLocalKey(stack, f.token, SOURCE, f.material.toString('hex'));
    return f;
  }

  /** A real worker process on the stack's Redis prefix, with `env` on top (a fault point); killed by close(). */
  worker(env: Record<string, string>): Child {
    const child = runEntry('worker/main.ts', { ...this.stack.childEnv(), ...env });
    this.children.push(child);
    return child;
  }

  async submit(alias: string, source = SOURCE): Promise<string> {
    const res = await this.stack.call('POST', '/api/v1/cckm/aws/upload-key', {
      token: this.token,
      body: { source_key_identifier: source, region: 'ap-south-1', kms: 'kms', aws_param: { Alias: alias, Tags: [{ TagKey: 'team', TagValue: 'crash' }] } },
    });
    expect(res.status).toBe(202);
    this.jobIds.push(res.body.id);
    return res.body.id as string;
  }

  taggedWith(jobId: string) {
    return this.stack.emulator.keys().filter((k) => k.tags.some((t) => t.TagKey === JOB_TAG_KEY && t.TagValue === jobId));
  }

  expectNoOrphanKeys(): void {
    for (const key of this.stack.emulator.keys()) {
      if (this.bystanders.has(key.keyId)) continue;
      const owner = key.tags.find((t) => t.TagKey === JOB_TAG_KEY)?.TagValue;
      expect(this.jobIds, `key ${key.keyId} belongs to no job`).toContain(owner);
    }
  }

  /** How many uploaded-key resources the stack's Redis holds. */
  async uploadedKeyRecords(): Promise<number> {
    let count = 0;
    let cursor = '0';
    do {
      const [next, keys] = await this.stack.redis.scan(cursor, 'MATCH', `${this.stack.config.KEYFERRY_PREFIX}:key:*`, 'COUNT', 1000);
      cursor = next;
      count += keys.length;
    } while (cursor !== '0');
    return count;
  }

  async close(): Promise<void> {
    for (const child of this.children) child.proc.kill('SIGKILL');
    await this.stack.close();
  }
}

/** Resolves once process `pid` is stopped (state T in /proc/<pid>/stat); rejects after `timeoutMs`. */
export async function stopped(pid: number, timeoutMs = 20_000): Promise<void> {
  for (const end = Date.now() + timeoutMs; Date.now() < end; await new Promise((r) => setTimeout(r, 20))) {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    if (stat.slice(stat.lastIndexOf(')') + 2).startsWith('T')) return;
  }
  throw new Error(`process ${pid} did not stop within ${timeoutMs} ms`);
}
