import type { QueueEvents } from 'bullmq';
import type { Config } from '../shared/config.js';
import { closeQueueEvents, createUploadQueueEvents, type UploadQueue } from '../shared/queues.js';
import { createRedis, type RedisClient } from '../shared/redis.js';
import type { Keyspace } from '../shared/stores/keyspace.js';

/** A running QueueEvents subscription and how to end it (with its connection). */
export interface EventSubscription {
  events: QueueEvents;
  close(): Promise<void>;
}

export interface JobWaiterOptions {
  /** The id of the newest entry of the queue's event stream, `0-0` when it is empty. */
  lastEventId(): Promise<string>;
  /** Starts a QueueEvents that reads the stream after `lastEventId`, on a connection of its own. */
  subscribe(lastEventId: string): EventSubscription;
  /** How long the subscription stays open after the last wait ended (a burst of waits shares one). */
  lingerMs?: number;
}

const LINGER_MS = 10_000;

/**
 * The API's waiter options for the upload queue: the newest entry of its event stream read on the API's client,
 * and each subscription on a connection BullMQ makes for it and drops when it closes (also while Redis is away).
 */
export function uploadQueueWaiting(deps: { config: Config; redis: RedisClient; queue: UploadQueue; keys: Keyspace; onError: (err: Error) => void }): JobWaiterOptions {
  return {
    lastEventId: async () => (await deps.redis.xrevrange(deps.queue.toKey('events'), '+', '-', 'COUNT', 1))[0]?.[0] ?? '0-0',
    subscribe: (lastEventId) => {
      const events = createUploadQueueEvents(createRedis(deps.config, { lazyConnect: true }), deps.keys, { lastEventId });
      events.on('error', deps.onError);
      return { events, close: () => closeQueueEvents(events) };
    },
  };
}

/**
 * Waits for jobs to finish on BullMQ's event stream: one QueueEvents subscription per API process, fanned
 * out to the requests waiting on a job id (no polling loop per request). The subscription runs only while
 * requests wait (and `lingerMs` after): a QueueEvents receives every event of the queue, several per job,
 * and an API process that read them all the time would spend its CPU on events nobody waits for.
 */
export class JobWaiter {
  readonly #waiting = new Map<string, Set<() => void>>();
  readonly #lingerMs: number;
  #subscription: Promise<EventSubscription> | undefined;
  #active = 0;
  #idle: NodeJS.Timeout | undefined;

  constructor(private readonly opts: JobWaiterOptions) {
    this.#lingerMs = opts.lingerMs ?? LINGER_MS;
  }

  /** True while a subscription is open (or opening). */
  get subscribed(): boolean {
    return this.#subscription !== undefined;
  }

  /**
   * Resolves once `isDone` says the job finished, or after `ms`. `isDone` is checked first and again after
   * each completed or failed event of the job, until the record says so. The subscription reads the
   * stream from an entry taken before the first check, and the job's record is final before BullMQ adds the
   * event: a job that finishes at any moment is not missed. Without a subscription (Redis away) it resolves
   * at once; the caller answers with what it has.
   */
  async wait(jobId: string, ms: number, isDone: () => Promise<boolean>): Promise<void> {
    const deadline = Date.now() + ms;
    this.#active++;
    try {
      try {
        await this.#subscribe();
      } catch {
        return;
      }
      for (;;) {
        const next = this.#nextEvent(jobId, deadline - Date.now());
        try {
          if ((await isDone()) || !(await next.woken)) return;
        } finally {
          next.cancel();
        }
      }
    } finally {
      this.#active--;
      this.#closeWhenIdle();
    }
  }

  /**
   * Ends the subscription now: at API shutdown, once the server has finished its requests, or after lingerMs
   * without a wait. A wait still running would not be woken by its job's events any more (only its timeout).
   */
  async close(): Promise<void> {
    clearTimeout(this.#idle);
    this.#idle = undefined;
    const subscription = this.#subscription;
    this.#subscription = undefined;
    await subscription?.then((s) => s.close()).catch(() => undefined);
  }

  #subscribe(): Promise<EventSubscription> {
    clearTimeout(this.#idle);
    this.#idle = undefined;
    if (!this.#subscription) {
      const opening = (async () => {
        const subscription = this.opts.subscribe(await this.opts.lastEventId());
        subscription.events.on('completed', this.#wake);
        subscription.events.on('failed', this.#wake);
        return subscription;
      })();
      this.#subscription = opening;
      opening.catch(() => {
        if (this.#subscription === opening) this.#subscription = undefined;
      });
    }
    return this.#subscription;
  }

  readonly #wake = ({ jobId }: { jobId: string }) => {
    const set = this.#waiting.get(jobId);
    if (!set) return;
    this.#waiting.delete(jobId);
    for (const fn of set) fn();
  };

  /** Registers now for the job's next event: `woken` is true on the event, false after `ms`. */
  #nextEvent(jobId: string, ms: number): { woken: Promise<boolean>; cancel(): void } {
    let wake!: () => void;
    let timer: NodeJS.Timeout | undefined;
    const woken = new Promise<boolean>((resolve) => {
      wake = () => resolve(true);
      timer = setTimeout(() => resolve(false), Math.max(0, ms));
    });
    const set = this.#waiting.get(jobId) ?? new Set();
    set.add(wake);
    this.#waiting.set(jobId, set);
    return {
      woken,
      cancel: () => {
        clearTimeout(timer);
        set.delete(wake);
        if (set.size === 0 && this.#waiting.get(jobId) === set) this.#waiting.delete(jobId);
      },
    };
  }

  #closeWhenIdle(): void {
    if (this.#active > 0 || !this.#subscription || this.#idle) return;
    this.#idle = setTimeout(() => void this.close(), this.#lingerMs);
    this.#idle.unref();
  }
}
