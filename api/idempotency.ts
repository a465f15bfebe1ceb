import { canonicalJson, sha256Hex } from '../shared/crypto.js';
import { AppError, UnprocessableError } from '../shared/errors.js';
import { defineScript, type RedisClient, type RedisScript } from '../shared/redis.js';
import type { Keyspace } from '../shared/stores/keyspace.js';

export const IDEMPOTENCY_TTL_SECONDS = 86_400;
/** A claim older than this whose record does not exist was left by a request that failed (Idempotency.claim). */
export const STALE_CLAIM_MS = 30_000;
/** How long a request waits for the first request with its key to write its record, or to finish undoing. */
const IN_FLIGHT_WAIT_MS = 2_000;
/** Replaces the claim ARGV[1] by ARGV[2] (with a fresh TTL of ARGV[3] s) only if it is still ARGV[1]. */
const SWAP_CLAIM = `
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1`;
/** Deletes the claim only if it is still ARGV[1] (a request that failed late must not free a claim taken over). */
const RELEASE_CLAIM = `
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])`;

/**
 * What an Idempotency-Key's Redis key holds: the request body's fingerprint, the id of the job or batch it
 * made, when, and a state. `undoing`: the request failed and is taking back what it made (undoSubmission,
 * undoBatch); a replay waits until it has finished. `adopted`: a replay found the record and enqueues it (again);
 * the first request's undo then leaves everything alone.
 */
interface ClaimValue {
  fingerprint: string;
  id: string;
  /** When the request wrote it, by its own clock: for people reading Redis; staleness goes by the key's TTL. */
  at: number;
  state?: 'undoing' | 'adopted';
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface ClaimScripts {
  swap: RedisScript;
  release: RedisScript;
  get(key: string): Promise<string | null>;
}

/**
 * One request's hold on an Idempotency-Key (or on nothing, without a key): every change is a compare-and-set
 * on the value this request last wrote, so a request never overwrites or frees a claim that a replay adopted
 * or another request took over.
 */
export class Claim {
  /** A request without an Idempotency-Key: nothing to release, and its undo always goes ahead. */
  static readonly none = new Claim(undefined, undefined, '');
  #value: string;
  /** Another request took the key over: this one's undo goes on without touching the claim. */
  #detached = false;

  constructor(
    private readonly scripts: ClaimScripts | undefined,
    /** The claim's Redis key (undefined without an Idempotency-Key). */
    readonly redisKey: string | undefined,
    value: string,
  ) {
    this.#value = value;
  }

  /** Deletes the claim, if it is still as this request last wrote it. */
  async release(): Promise<void> {
    if (this.scripts && this.redisKey && !this.#detached) await this.scripts.release([this.redisKey], [this.#value]);
  }

  /**
   * Marks the claim `undoing` before a failed request takes back its record and job. False if a replay adopted
   * it meanwhile (it still names this request's id): the undo must then leave everything alone. If another
   * request took the key over (a stale claim: it names another id), this request's own record and job are
   * still undone, and the claim is left to its new holder.
   */
  async beginUndo(): Promise<boolean> {
    return this.#undoing();
  }

  /**
   * Checks again, after the undo took the job out of the queue and just before it deletes the record, that the
   * claim is still this request's `undoing` one, and restarts its clock, so that no replay takes it for stale
   * while the undo ends. False if a replay adopted it meanwhile (the undo had stalled past the stale-claim
   * age, and the replay enqueued the job again, perhaps before the undo's remove): the job must then be queued.
   */
  async renewUndo(): Promise<boolean> {
    return this.#undoing();
  }

  /** The undo found the job accepted after all (a worker holds it): the claim answers replays again. */
  async endUndo(): Promise<boolean> {
    return this.#swap(undefined);
  }

  async #undoing(): Promise<boolean> {
    if (!this.scripts || !this.redisKey || this.#detached) return true;
    if (await this.#swap('undoing')) return true;
    const current = await this.scripts.get(this.redisKey);
    const holder = current ? (JSON.parse(current) as ClaimValue).id : undefined;
    if (holder === (JSON.parse(this.#value) as ClaimValue).id) return false;
    this.#detached = true;
    return true;
  }

  /** Compare-and-set from this request's value to the same claim in `state`. */
  async #swap(state: ClaimValue['state']): Promise<boolean> {
    if (!this.scripts || !this.redisKey || this.#detached) return true;
    const { state: _old, ...rest } = JSON.parse(this.#value) as ClaimValue;
    const next = JSON.stringify(state ? { ...rest, state, at: Date.now() } : rest);
    if (Number(await this.scripts.swap([this.redisKey], [this.#value, next, IDEMPOTENCY_TTL_SECONDS])) !== 1) return false;
    this.#value = next;
    return true;
  }
}

/** A key used before with the same body: the id it made, and the claim as read, with its Redis key (for `adopt`). */
export interface PriorClaim {
  id: string;
  raw: string;
  redisKey: string;
}

/**
 * Idempotency-Key claims: the first request with a key claims it for the id it is about to make (SET NX); a
 * request with the same key and body is answered with that id, one with another body gets 422.
 */
export class Idempotency {
  readonly #scripts: ClaimScripts;

  constructor(
    private readonly redis: RedisClient,
    private readonly keys: Keyspace,
    /** How old a claim without a record must be before a retry takes it over (see claim). */
    private readonly staleClaimMs = STALE_CLAIM_MS,
  ) {
    this.#scripts = { swap: defineScript(redis, 'idempotency_swap', SWAP_CLAIM), release: defineScript(redis, 'idempotency_release', RELEASE_CLAIM), get: (key) => redis.get(key) };
  }

  /**
   * Claims `key` for `newId`. If the key was used before with the same body, returns the earlier id as `prior`;
   * with another body, throws 422.
   *
   * A claim can outlive its request without a record: Redis ran the SET NX but its answer was lost and the
   * request failed (503) before it could release the claim. A claim older than `staleClaimMs` whose record
   * `load` does not find is taken over (compare-and-set on the claim's value), so a retry is accepted instead
   * of answering 409 `idempotency_key_in_flight` for the key's whole lifetime. A request writes its record
   * right after claiming (one Redis command, or one MULTI for a batch, failing fast while Redis is away), far
   * within that time. A claim being undone is waited for (up to 2 s, then 409) and taken over once its record
   * is gone; one left `undoing` longer than `staleClaimMs` (its request died mid-undo) counts as a plain claim.
   * A claim that keeps changing under the request for as long (other requests with the key taking turns) also
   * answers 409.
   */
  async claim(
    account: string,
    key: string | undefined,
    body: unknown,
    newId: string,
    load: (priorId: string) => Promise<unknown>,
    deadline = Date.now() + IN_FLIGHT_WAIT_MS,
  ): Promise<{ prior?: PriorClaim; claim: Claim }> {
    if (key === undefined) return { claim: Claim.none };
    const redisKey = this.keys.idempotency(account, sha256Hex(key));
    const fingerprint = sha256Hex(canonicalJson(body));
    const value = JSON.stringify({ fingerprint, id: newId, at: Date.now() } satisfies ClaimValue);
    const claim = new Claim(this.#scripts, redisKey, value);
    // Every way round again is bounded by the deadline: a claim that keeps changing under this request (other
    // requests with the same key taking turns at it) answers 409 like one that stays in flight.
    const again = async (pauseMs = 0) => {
      if (Date.now() > deadline) throw inFlight();
      if (pauseMs > 0) await sleep(pauseMs);
      return this.claim(account, key, body, newId, load, deadline);
    };
    if ((await this.redis.set(redisKey, value, 'EX', IDEMPOTENCY_TTL_SECONDS, 'NX')) !== null) return { claim };
    // The claim and how long ago it was last written, by Redis's clock (every write sets the same TTL): the API
    // processes' clocks may disagree.
    const [[, raw], [, pttl]] = (await this.redis.multi().get(redisKey).pttl(redisKey).exec()) as [[unknown, string | null], [unknown, number]];
    if (!raw) return again(); // it expired or was released just now
    const prior = JSON.parse(raw) as ClaimValue;
    // Our own claim: Redis ran the SET NX, its answer was lost, and ioredis sent it again after reconnecting.
    if (prior.id === newId) return { claim: new Claim(this.#scripts, redisKey, raw) };
    if (prior.fingerprint !== fingerprint) {
      throw new UnprocessableError('idempotency_key_reused', 'This Idempotency-Key was used with a different request body.');
    }
    const stale = IDEMPOTENCY_TTL_SECONDS * 1000 - pttl > this.staleClaimMs;
    const undoing = prior.state === 'undoing';
    if ((stale || undoing) && (await load(prior.id)) === undefined) {
      if (Number(await this.#scripts.swap([redisKey], [raw, value, IDEMPOTENCY_TTL_SECONDS])) === 1) return { claim };
      return again(10); // another request changed it meanwhile
    }
    if (undoing && !stale) return again(50);
    return { prior: { id: prior.id, raw, redisKey }, claim };
  }

  /**
   * Marks a prior claim `adopted` before a replay enqueues its record again (compare-and-set on the claim as
   * read): from then on the first request's undo leaves the record and the job alone. False if the claim changed
   * since it was read (its request began undoing, say): the replay must start over.
   */
  async adopt(prior: PriorClaim): Promise<boolean> {
    const value = JSON.parse(prior.raw) as ClaimValue;
    if (value.state === 'adopted') return true;
    const next = JSON.stringify({ ...value, state: 'adopted' });
    return Number(await this.#scripts.swap([prior.redisKey], [prior.raw, next, IDEMPOTENCY_TTL_SECONDS])) === 1;
  }

  /** Whether the claim at `redisKey` (a batch record's `claim`) still names the id `id`. */
  async names(redisKey: string, id: string): Promise<boolean> {
    const raw = await this.redis.get(redisKey);
    return raw !== null && (JSON.parse(raw) as ClaimValue).id === id;
  }

  /** The first request with an Idempotency-Key may still be writing its record: wait for it briefly. */
  async waitForRecord<T>(load: () => Promise<T | undefined>): Promise<T> {
    for (let waited = 0; waited < IN_FLIGHT_WAIT_MS; waited += 50) {
      const found = await load();
      if (found) return found;
      await sleep(50);
    }
    throw inFlight();
  }
}

function inFlight(): AppError {
  return new AppError(409, 'idempotency_key_in_flight', 'A request with this Idempotency-Key is still being accepted; retry shortly.');
}
