import { describe, expect, it } from 'vitest';
import { uploadBackoffDelay } from '../shared/queues.js';

const config = { JOB_BACKOFF_MS: 1000, JOB_BACKOFF_MAX_MS: 300_000 };

describe('upload retry backoff', () => {
  it('when attempts grow, then the delay doubles from the base until the cap', () => {
    expect([1, 2, 3, 4].map((n) => uploadBackoffDelay(n, config, 0.5))).toEqual([1000, 2000, 4000, 8000]);
    expect(uploadBackoffDelay(30, config, 0.5)).toBe(300_000);
  });

  it('when jitter is drawn, then the delay stays within ±50% of the nominal one', () => {
    expect(uploadBackoffDelay(3, config, 0)).toBe(2000);
    expect(uploadBackoffDelay(3, config, 0.999999)).toBe(6000);
  });
});
