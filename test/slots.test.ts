import { describe, expect, it } from 'vitest';
import { Slots } from '../worker/slots.js';

/** Settles pending promise callbacks. */
const flush = () => new Promise((r) => setImmediate(r));

describe('Slots (the worker’s upload slots)', () => {
  it('when all slots are held, then the next acquirers wait and get freed slots in arrival order', async () => {
    const slots = new Slots(2);
    expect(await slots.acquire()).toBe(true);
    expect(await slots.acquire()).toBe(true);
    const order: string[] = [];
    void slots.acquire().then((held) => order.push(`a:${held}`));
    void slots.acquire().then((held) => order.push(`b:${held}`));
    await flush();
    expect(order).toEqual([]);
    expect(slots.waiting).toBe(2);
    slots.release();
    await flush();
    expect(order).toEqual(['a:true']);
    slots.release();
    await flush();
    expect(order).toEqual(['a:true', 'b:true']);
    expect(slots.waiting).toBe(0);
  });

  it('when a slot is released with nobody waiting, then the next acquire gets it at once', async () => {
    const slots = new Slots(1);
    expect(await slots.acquire()).toBe(true);
    slots.release();
    expect(await slots.acquire()).toBe(true);
    let got: boolean | undefined;
    void slots.acquire().then((held) => (got = held));
    await flush();
    expect(got).toBeUndefined();
  });

  it('when the slots close, then waiters and later acquirers get false and holders keep theirs', async () => {
    const slots = new Slots(1);
    expect(await slots.acquire()).toBe(true);
    const waiter = slots.acquire();
    slots.close();
    expect(await waiter).toBe(false);
    expect(await slots.acquire()).toBe(false);
    expect(slots.waiting).toBe(0);
    slots.release(); // the holder's release after the close throws nothing
  });

  it('when the size is not a positive integer, then it throws', () => {
    expect(() => new Slots(0)).toThrow(RangeError);
    expect(() => new Slots(1.5)).toThrow(RangeError);
  });
});
