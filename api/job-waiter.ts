import type { QueueEvents } from 'bullmq';

/**
 * Waits for jobs to finish on BullMQ's event stream: one QueueEvents subscription per API process,
 * fanned out to the requests waiting on a job id (no polling loop per request).
 */
export class JobWaiter {
  readonly #waiting = new Map<string, Set<() => void>>();

  constructor(events: QueueEvents) {
    const wake = ({ jobId }: { jobId: string }) => {
      const set = this.#waiting.get(jobId);
      if (!set) return;
      this.#waiting.delete(jobId);
      for (const fn of set) fn();
    };
    events.on('completed', wake);
    events.on('failed', wake);
  }

  /**
   * Resolves when the job finishes or after `ms`, whichever is first. `isDone` is checked after
   * subscribing, so a job that finished just before the call is not missed.
   */
  async wait(jobId: string, ms: number, isDone: () => Promise<boolean>): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    let wakeFn: (() => void) | undefined;
    const finished = new Promise<void>((resolve) => {
      wakeFn = resolve;
      const set = this.#waiting.get(jobId) ?? new Set();
      set.add(resolve);
      this.#waiting.set(jobId, set);
      timer = setTimeout(resolve, ms);
    });
    try {
      if (await isDone()) return;
      await finished;
    } finally {
      clearTimeout(timer);
      const set = this.#waiting.get(jobId);
      if (set && wakeFn) {
        set.delete(wakeFn);
        if (set.size === 0) this.#waiting.delete(jobId);
      }
    }
  }
}
