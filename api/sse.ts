import { Cluster } from 'ioredis';
import type { Request, Response } from 'express';
import type { RedisClient } from '../shared/redis.js';
import { problem, sendProblem } from './problem.js';

/**
 * The event streams each account holds open on this API process, at most `max` at once: each stream reads
 * with a Redis connection of its own, so one account's streams could otherwise use up Redis's clients.
 */
export class StreamLimit {
  readonly #open = new Map<string, number>();

  constructor(readonly max: number) {}

  /** Takes a place for one of the account's streams; false when it holds `max` already. */
  take(account: string): boolean {
    const n = this.#open.get(account) ?? 0;
    if (n >= this.max) return false;
    this.#open.set(account, n + 1);
    return true;
  }

  release(account: string): void {
    const n = (this.#open.get(account) ?? 1) - 1;
    if (n > 0) this.#open.set(account, n);
    else this.#open.delete(account);
  }
}

export interface SseEvent {
  id: string;
  event: string;
  data: string;
}

/**
 * Streams a Redis stream as Server-Sent Events: `first` events (a snapshot) are sent, then new stream
 * entries after `Last-Event-ID` (or after the snapshot) with blocking XREADs on a connection of the
 * stream's own, a keep-alive comment whenever `keepAliveMs` pass quietly, until `isFinal` says the
 * last event was sent or the client goes away. An account that holds `limit.max` streams open already gets a
 * `429` problem instead.
 */
export async function streamEvents(
  req: Request,
  res: Response,
  opts: {
    redis: RedisClient;
    account: string;
    limit: StreamLimit;
    streamKey: string;
    keepAliveMs: number;
    snapshot: (lastId: string) => Promise<SseEvent[]>;
    isFinal: (e: SseEvent) => boolean;
    /** Rewrites a stream entry before it is sent (e.g. fills in the final resource). */
    map?: (e: SseEvent) => Promise<SseEvent>;
  },
): Promise<void> {
  if (!opts.limit.take(opts.account)) {
    res.setHeader('Retry-After', '5');
    return sendProblem(
      res,
      problem(429, 'too_many_streams', `This account holds ${opts.limit.max} event streams open on this server already; close one, or poll the resource.`, { instance: req.originalUrl }),
    );
  }
  res.on('close', () => opts.limit.release(opts.account));
  res.status(200).set({ 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-cache', Connection: 'keep-alive', 'X-Accel-Buffering': 'no' });
  res.flushHeaders();
  // A Cluster's copy takes its settings as they are now: it must queue its first commands until it is connected.
  const conn = opts.redis instanceof Cluster ? opts.redis.duplicate(undefined, { enableOfflineQueue: true }) : opts.redis.duplicate();
  conn.on('error', () => undefined); // a failed read rejects the XREAD below, which ends the stream
  let open = !res.destroyed;
  res.on('close', () => {
    open = false;
    conn.disconnect();
  });
  const send = (e: SseEvent) => res.write(`id: ${e.id}\nevent: ${e.event}\ndata: ${e.data}\n\n`);

  try {
    let cursor = req.get('last-event-id') ?? '';
    const resumed = /^\d+-\d+$/.test(cursor);
    if (!resumed) {
      const last = await conn.xrevrange(opts.streamKey, '+', '-', 'COUNT', 1);
      cursor = last[0]?.[0] ?? '0-0';
      for (const e of await opts.snapshot(cursor)) {
        send(e);
        if (opts.isFinal(e)) return;
      }
    }
    for (let first = resumed; open; first = false) {
      const got = first
        ? await conn.xread('COUNT', 500, 'STREAMS', opts.streamKey, cursor)
        : await conn.xread('COUNT', 500, 'BLOCK', opts.keepAliveMs, 'STREAMS', opts.streamKey, cursor);
      if (!got && first) {
        // A client resuming after the end (or from an id past it): nothing newer will come, so a final
        // snapshot is sent and the stream ends instead of idling forever.
        const final = (await opts.snapshot(cursor)).filter(opts.isFinal);
        for (const e of final) send(e);
        if (final.length > 0) return;
        continue;
      }
      if (!got) {
        res.write(': keep-alive\n\n');
        continue;
      }
      for (const [, entries] of got) {
        for (const [id, fields] of entries) {
          cursor = id;
          const f = Object.fromEntries(pairs(fields));
          const raw = { id, event: f.event ?? 'message', data: f.data ?? '' };
          const e = opts.map ? await opts.map(raw) : raw;
          send(e);
          if (opts.isFinal(e)) return;
        }
      }
    }
  } catch (err) {
    if (open) throw err;
  } finally {
    conn.disconnect();
    res.end();
  }
}

function pairs(fields: string[]): [string, string][] {
  const out: [string, string][] = [];
  for (let i = 0; i + 1 < fields.length; i += 2) out.push([fields[i] as string, fields[i + 1] as string]);
  return out;
}
