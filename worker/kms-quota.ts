import { setTimeout as sleep } from 'node:timers/promises';
import type { KMSClient } from '@aws-sdk/client-kms';
import type { JobRecord } from '../shared/jobs.js';
import { UNMETERED, type KmsOperation, type KmsQuotas } from '../shared/kms-quotas.js';
import { kmsRequestDuration, kmsRequests } from '../shared/metrics.js';
import { defineScript, type RedisClient, type RedisScript } from '../shared/redis.js';
import type { KmsConnection } from '../shared/resources.js';
import type { Keyspace } from '../shared/stores/keyspace.js';

/**
 * The request slots of KMS operations in one AWS account and region, 1/rate apart on Redis's clock, so that
 * all workers together keep to the quota. Per operation, three keys: the next free slot (ms), and the slots
 * reserved (ticket → slot) for batch jobs and for single uploads that were told to come back. KEYS: those
 * three for each operation asked for (one or more; all in the account and region's hash slot). ARGV: [1] the
 * longest wait granted (ms), [2] the ticket (a job id), [3] '1' for a single upload, [4] how long a
 * reservation is kept once due (ms), then for each operation the interval between its slots (ms).
 *
 * Per operation: the ticket's reserved slot, else a new one, is granted when it is at most ARGV[1] away:
 * `1, wait`, send after `wait` ms. A slot further off is reserved for the ticket: `0, wait`, ask again then.
 * A single upload takes the first slot a batch job reserved, and that job the new one, so single uploads
 * overtake batches as they do in the queue. A reservation overdue by more than ARGV[4] is dropped (its job
 * came back too late, or never), so that jobs coming back late cannot send more than ARGV[4] worth of slots
 * at once. Returns the pairs of all operations, in order, in one flat list.
 */
const TAKE_SLOTS = `
local t = redis.call('TIME')
local now = t[1] * 1000 + t[2] / 1000
local maxWait, ticket, grace = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[4])
local single = ARGV[3] == '1'
local out = {}
for n = 1, #KEYS / 3 do
  local bucket, batch, singles = KEYS[3 * n - 2], KEYS[3 * n - 1], KEYS[3 * n]
  local interval = tonumber(ARGV[4 + n])
  local mine = single and singles or batch
  redis.call('ZREMRANGEBYSCORE', batch, '-inf', now - grace)
  redis.call('ZREMRANGEBYSCORE', singles, '-inf', now - grace)
  local slot = tonumber(redis.call('ZSCORE', mine, ticket))
  local reserved = slot ~= nil
  if not reserved then
    slot = math.max(now, tonumber(redis.call('GET', bucket)) or 0)
    redis.call('SET', bucket, slot + interval, 'PX', math.ceil(slot + interval - now + grace))
    local first = single and redis.call('ZRANGE', batch, 0, 0, 'WITHSCORES') or {}
    if first[1] then
      redis.call('ZADD', batch, slot, first[1])
      slot = tonumber(first[2])
    end
  end
  local wait = math.max(0, math.ceil(slot - now))
  local granted = wait <= maxWait
  if granted and reserved then redis.call('ZREM', mine, ticket) end
  if not granted and not reserved then redis.call('ZADD', mine, slot, ticket) end
  local ttl = redis.call('PTTL', bucket)
  if ttl > 0 then
    redis.call('PEXPIRE', batch, ttl)
    redis.call('PEXPIRE', singles, ttl)
  end
  out[#out + 1] = granted and 1 or 0
  out[#out + 1] = wait
end
return out
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

/** Errors of taking a request's slot (Redis failed): thrown before the request was sent. */
const slotFailures = new WeakSet<object>();

/** The request was never sent: its slot is further off than the job may sleep, or could not be taken. */
export function neverSent(err: unknown): boolean {
  return err instanceof KmsQuotaWait || (typeof err === 'object' && err !== null && slotFailures.has(err));
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
  /**
   * Takes a slot of each operation now, in one round trip to Redis, for requests about to be sent together:
   * the next `send` of each of these operations uses it instead of taking its own.
   */
  takeSlots(ops: readonly KmsOperation[]): void;
}

/** A slot as the script answers: granted (1) or reserved (0), and the wait until it, ms. */
type Slot = readonly [granted: number, waitMs: number];
/** The slot of an operation that is not metered: granted, now. */
const UNMETERED_SLOT: Slot = [1, 0];

/** AWS KMS request quotas per (AWS account, region, operation), kept by all workers together through Redis. */
export class KmsQuota {
  readonly #takeSlots: RedisScript;

  constructor(
    private readonly deps: {
      redis: RedisClient;
      keys: Keyspace;
      /** KMS_QUOTAS; a connection's own quotas override them. */
      quotas: KmsQuotas;
      /** KMS_QUOTA_MAX_SLEEP_MS. */
      maxSleepMs: number;
    },
  ) {
    this.#takeSlots = defineScript(deps.redis, 'kms_take_slots', TAKE_SLOTS);
  }

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
    /** Slots taken ahead by takeSlots, each for the next send of its operation. */
    const taken = new Map<KmsOperation, Promise<Slot>>();
    return {
      send: (op, command) => {
        const slot = taken.get(op);
        taken.delete(op);
        return this.#send(target, op, command, slot);
      },
      takeSlots: (ops) => {
        const slots = this.#take(target, ops, target.ticket, target.single, target.maxSleepMs);
        ops.forEach((op, i) => {
          const slot = slots.then((all) => all[i] as Slot);
          // Its send awaits it; should that send never come, a failure here is nobody's to handle.
          slot.catch(() => undefined);
          taken.set(op, slot);
        });
      },
    };
  }

  /** One slot of each metered operation's bucket, in one script call (none when none is metered). */
  async #take(target: Target, ops: readonly KmsOperation[], ticket: string, single: boolean, maxSleepMs: number): Promise<Slot[]> {
    const rateOf = (op: KmsOperation) => target.conn.quotas?.[op] ?? this.deps.quotas[op];
    const metered = ops.filter((op) => rateOf(op) !== UNMETERED);
    const keys: string[] = [];
    const intervals: number[] = [];
    for (const op of metered) {
      const key = this.deps.keys.kmsQuota(target.conn.account_id, target.region, op);
      keys.push(key, `${key}:batch`, `${key}:single`);
      intervals.push(1000 / rateOf(op));
    }
    const flat = metered.length > 0 ? ((await this.#takeSlots(keys, [maxSleepMs, ticket, single ? '1' : '0', RESERVATION_GRACE_MS, ...intervals])) as number[]) : [];
    const slots = new Map(metered.map((op, i) => [op, [flat[2 * i] as number, flat[2 * i + 1] as number] as const]));
    return ops.map((op) => slots.get(op) ?? UNMETERED_SLOT);
  }

  /** The one way keyferry calls KMS: a slot of the operation's bucket, then the command. */
  async #send<Output>(target: Target, op: KmsOperation, command: KmsCommand<Output>, slot?: Promise<Slot>): Promise<Output> {
    const [granted, waitMs] = await (slot ?? this.#take(target, [op], target.ticket, target.single, target.maxSleepMs).then((all) => all[0] as Slot)).catch((err: unknown) => {
      if (typeof err === 'object' && err !== null) slotFailures.add(err);
      throw err;
    });
    if (!granted) throw new KmsQuotaWait(op, waitMs);
    if (waitMs > 0) await sleep(waitMs);
    const endTimer = kmsRequestDuration.startTimer({ operation: op });
    // The call's deadline is the client's (KmsClients): no per-call options, so its middleware stays cached.
    try {
      // KMSClient.send's types cannot take "any KMS command": the command goes in untyped, its output comes back typed.
      const output: unknown = await target.client.send(command as never);
      endTimer();
      kmsRequests.inc({ operation: op, outcome: 'ok', code: '' });
      return output as Output;
    } catch (err) {
      endTimer();
      kmsRequests.inc({ operation: op, outcome: 'error', code: kmsErrorCode(err) });
      // Another client uses this account's quota too: the next free slot goes unused, for every worker.
      if ((err as Error).name === 'ThrottlingException') await this.#take(target, [op], '', false, NO_LIMIT_MS);
      throw err;
    }
  }
}
