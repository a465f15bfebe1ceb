/**
 * A first-come, first-served semaphore: at most `size` holders at once, the others wait in arrival order.
 * The worker's upload slots (WORKER_CONCURRENCY): BullMQ hands the worker WORKER_PREFETCH jobs more than that,
 * which wait here for a slot, so that a slot freed by a finished upload is taken at once.
 */
export class Slots {
  #free: number;
  #closed = false;
  readonly #waiting: ((held: boolean) => void)[] = [];

  constructor(size: number) {
    if (!Number.isInteger(size) || size < 1) throw new RangeError(`slots: size must be a positive integer, not ${size}`);
    this.#free = size;
  }

  /** True once a slot is held (release it then); false, holding nothing, if the slots were closed first. */
  acquire(): Promise<boolean> {
    if (this.#closed) return Promise.resolve(false);
    if (this.#free > 0) {
      this.#free--;
      return Promise.resolve(true);
    }
    return new Promise((resolve) => this.#waiting.push(resolve));
  }

  /** Hands the slot to the first waiter, if any. */
  release(): void {
    const next = this.#waiting.shift();
    if (next) next(true);
    else this.#free++;
  }

  /** Every waiter, and every later acquire, gets false; holders keep their slots until they release them. */
  close(): void {
    this.#closed = true;
    for (const waiter of this.#waiting.splice(0)) waiter(false);
  }

  /** How many wait for a slot. */
  get waiting(): number {
    return this.#waiting.length;
  }
}
