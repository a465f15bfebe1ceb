import { EventSource } from 'eventsource';

export interface ReceivedEvent {
  event: string;
  id: string;
  data: string;
}

/**
 * Collects Server-Sent Events with the real `eventsource` client until `until` accepts one (then closes)
 * or the timeout passes (then rejects with what arrived).
 */
export function collectEvents(url: string, token: string, opts: { names: string[]; until: (e: ReceivedEvent) => boolean; timeoutMs?: number; lastEventId?: string }): Promise<ReceivedEvent[]> {
  return new Promise((resolve, reject) => {
    const got: ReceivedEvent[] = [];
    const es = new EventSource(url, {
      fetch: (input, init) =>
        fetch(input, {
          ...init,
          headers: { ...init?.headers, Authorization: `Bearer ${token}`, ...(opts.lastEventId ? { 'Last-Event-ID': opts.lastEventId } : {}) },
        }),
    });
    const timer = setTimeout(() => {
      es.close();
      reject(new Error(`no final event within ${opts.timeoutMs ?? 20_000} ms; got ${JSON.stringify(got.map((e) => e.event))}`));
    }, opts.timeoutMs ?? 20_000);
    for (const name of opts.names) {
      es.addEventListener(name, (e: MessageEvent<string>) => {
        const received = { event: name, id: e.lastEventId, data: e.data };
        got.push(received);
        if (opts.until(received)) {
          clearTimeout(timer);
          es.close();
          resolve(got);
        }
      });
    }
  });
}
