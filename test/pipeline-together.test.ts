/**
 * worker/pipeline.ts `together`: a record write (possibly a checkpoint) and the KMS request sent with it.
 * Pure promise logic, no Redis or KMS needed.
 */
import { describe, expect, it } from 'vitest';
import { together } from '../worker/pipeline.js';

/** A promise settled after `ms` with what `outcome` returns or throws. */
const later = <T>(ms: number, outcome: () => T) =>
  new Promise<T>((resolve, reject) => {
    setTimeout(() => {
      try {
        resolve(outcome());
      } catch (err) {
        reject(err as Error);
      }
    }, ms);
  });

describe('together: a record write and the KMS request sent with it', () => {
  it('when both succeed, then the answer is the request’s', async () => {
    await expect(together(later(5, () => undefined), Promise.resolve('answer'))).resolves.toBe('answer');
  });

  it('when the request fails at once, then nothing is thrown before the write has settled', async () => {
    let written = false;
    const write = later(30, () => {
      written = true;
    });
    const failed = together(write, Promise.reject(new Error('AccessDeniedException')));
    await expect(failed).rejects.toThrow('AccessDeniedException');
    expect(written).toBe(true);
  });

  it('when the write and the request both fail, then the write’s failure is thrown, not the request’s', async () => {
    const write = later(10, () => {
      throw new Error('Connection is closed.');
    });
    await expect(together(write, Promise.reject(new Error('AccessDeniedException')))).rejects.toThrow('Connection is closed.');
  });

  it('when there is no write, then the request’s failure is thrown', async () => {
    await expect(together(undefined, Promise.reject(new Error('KMSInternalException')))).rejects.toThrow('KMSInternalException');
  });
});
