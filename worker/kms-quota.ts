import { setTimeout as sleep } from 'node:timers/promises';
import type { KMSClient } from '@aws-sdk/client-kms';
import type { JobRecord } from '../shared/jobs.js';
import type { KmsOperation, KmsQuotas } from '../shared/kms-quotas.js';
import { kmsRequestDuration, kmsRequests } from '../shared/metrics.js';
import type { RedisClient } from '../shared/redis.js';
import type { KmsConnection } from '../shared/resources.js';
import type { Keyspace } from '../shared/stores/keyspace.js';

/**
 * The request slots of one KMS operation in one AWS account and region, 1/rate apart on Redis's clock, so
 * that all workers together keep to the quota. KEYS[1] holds the next free slot (ms); KEYS[2] and KEYS[3]
 * the slots reserved (ticket → slot) for batch jobs and for single uploads that were told to come back.
 * ARGV: [1] the interval between slots (ms), [2] the longest wait granted (ms), [3] the ticket (a job id),
 * [4] '1' for a single upload, [5] how long a reservation is kept once due (ms).
 *
 * The ticket's reserved slot, else a new one, is granted when it is at most ARGV[2] away: `{1, wait}`, send
 * after `wait` ms. A slot further off is reserved for the ticket: `{0, wait}`, ask again then. A single
 * upload takes the first slot a batch job reserved, and that job the new one, so single uploads overtake
 * batches as they do in the queue. A reservation overdue by more than ARGV[5] is dropped (its job came back
 * too late, or never), so that jobs coming back late cannot send more than ARGV[5] worth of slots at once.
 */
const TAKE_SLOT = `
local t = redis.call('TIME')
local now = t[1] * 1000 + t[2] / 1000
local interval, maxWait, ticket, grace = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[5])
local single = ARGV[4] == '1'
local mine = single and KEYS[3] or KEYS[2]
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - grace)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - grace)
local slot = tonumber(redis.call('ZSCORE', mine, ticket))
local reserved = slot ~= nil
if not reserved then
  slot = math.max(now, tonumber(redis.call('GET', KEYS[1])) or 0)
  redis.call('SET', KEYS[1], slot + interval, 'PX', math.ceil(slot + interval - now + grace))
  local first = single and redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES') or {}
  if first[1] then
    redis.call('ZADD', KEYS[2], slot, first[1])
    slot = tonumber(first[2])
  end
end
local wait = math.max(0, math.ceil(slot - now))
local granted = wait <= maxWait
if granted and reserved then redis.call('ZREM', mine, ticket) end
if not granted and not reserved then redis.call('ZADD', mine, slot, ticket) end
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[2], ttl)
  redis.call('PEXPIRE', KEYS[3], ttl)
end
return {granted and 1 or 0, wait}
`;

/** How long past its time a reserved slot is still granted to its job. */
const RESERVATION_GRACE_MS = 500;
/** A wait longer than any quota allows: the caller always sleeps. */
const NO_LIMIT_MS = Number.MAX_SAFE_INTEGER;

/** The AWS error name (`NotFoundException`, `TimeoutError`, …) as a metric label, bounded in length and charset. */
function kmsErrorCode(err: unknown): string {
  const name = err instanceof Error ? err.name : '';
  return /^[A-Za-z0-9_.-]{1,64}$/.test(name) ? name : 'unknown';
}

/** A KMS command (`new CreateKeyCommand(…)`, …), typed by the output KMSClient.send resolves to. */
interface KmsCommand<Output> {
  resolveMiddleware(...args: never[]): (...args: never[]) => Promise<{ output: Output }>;
}

/**
 * Thrown instead of sending when the operation's slot is further off than the job may sleep: the slot is
 * reserved for the job, which should run again in `waitMs`.
 */
export class KmsQuotaWait extends Error {
  constructor(
    readonly op: KmsOperation,
    readonly waitMs: number,
  ) {
    super(`The ${op} quota of this AWS account and region has its next slot for this job in ${waitMs} ms.`);
    this.name = 'KmsQuotaWait';
  }
}

interface Target {
  client: KMSClient;
  conn: KmsConnection;
  region: string;
  /** The job's id: its reservations are under it. */
  ticket: string;
  /** A single upload (not a batch item). */
  single: boolean;
  maxSleepMs: number;
}

/** One job's KMS in one account and region: every request waits for a slot of its operation's bucket. */
export interface MeteredKms {
  send<Output>(op: KmsOperation, command: KmsCommand<Output>): Promise<Output>;
}

/** AWS KMS request quotas per (AWS account, region, operation), kept by all workers together through Redis. */
export class KmsQuota {
  constructor(
    private readonly deps: {
      redis: RedisClient;
      keys: Keyspace;
      /** KMS_QUOTAS; a connection's own quotas override them. */
      quotas: KmsQuotas;
      /** KMS_QUOTA_MAX_SLEEP_MS. */
      maxSleepMs: number;
      /** KMS_TIMEOUT_MS: the deadline of each call, from when it is sent. */
      timeoutMs: number;
    },
  ) {}

  /**
   * KMS through `client` (connection `conn`, the job's region) as `job` calls it. With `mayDelay`, a call
   * whose slot is further off than KMS_QUOTA_MAX_SLEEP_MS throws KmsQuotaWait; without, it sleeps until then.
   */
  forJob(job: JobRecord, conn: KmsConnection, client: KMSClient, opts: { mayDelay: boolean }): MeteredKms {
    const target: Target = {
      client,
      conn,
      region: job.request.region,
      ticket: job.id,
      single: job.batch_id === null,
      maxSleepMs: opts.mayDelay ? this.deps.maxSleepMs : NO_LIMIT_MS,
    };
    return { send: (op, command) => this.#send(target, op, command) };
  }

  /** The one way keyferry calls KMS: a slot of the operation's bucket, then the command with its deadline. */
  async #send<Output>(target: Target, op: KmsOperation, command: KmsCommand<Output>): Promise<Output> {
    const key = this.deps.keys.kmsQuota(target.conn.account_id, target.region, op);
    const rate = target.conn.quotas?.[op] ?? this.deps.quotas[op];
    const takeSlot = (ticket: string, single: boolean, maxSleepMs: number) =>
      this.deps.redis.eval(TAKE_SLOT, 3, key, `${key}:batch`, `${key}:single`, 1000 / rate, maxSleepMs, ticket, single ? '1' : '0', RESERVATION_GRACE_MS) as Promise<[number, number]>;

    const [granted, waitMs] = await takeSlot(target.ticket, target.single, target.maxSleepMs);
    if (!granted) throw new KmsQuotaWait(op, waitMs);
    if (waitMs > 0) await sleep(waitMs);
    const endTimer = kmsRequestDuration.startTimer({ operation: op });
    try {
      // KMSClient.send's types cannot take "any KMS command": the command goes in untyped, its output comes back typed.
      const output: unknown = await target.client.send(command as never, { abortSignal: AbortSignal.timeout(this.deps.timeoutMs) });
      endTimer();
      kmsRequests.inc({ operation: op, outcome: 'ok', code: '' });
      return output as Output;
    } catch (err) {
      endTimer();
      kmsRequests.inc({ operation: op, outcome: 'error', code: kmsErrorCode(err) });
      // Another client uses this account's quota too: the next free slot goes unused, for every worker.
      if ((err as Error).name === 'ThrottlingException') await takeSlot('', false, NO_LIMIT_MS);
      throw err;
    }
  }
}
