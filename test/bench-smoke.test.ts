import { describe, expect, it } from 'vitest';
import { runEntry } from './helpers/child.js';

// The benchmarks run by hand with real sizes; here each runs once with tiny sizes so they never rot.
const cases: [string, string[], RegExp][] = [
  ['bench/batch-intake.ts', ['--items', '10', '--runs', '1'], /ratio keyferry \/ raw addBulk: \d/],
  ['bench/memory.ts', ['--jobs', '5'], /bytes per finished job/],
  ['bench/intake.ts', ['--duration', '1', '--connections', '2'], /ratio keyferry \/ bare express \(requests\/s\): \d/],
];

describe('benchmark scripts', () => {
  it.each(cases)('when %s runs with tiny sizes, then it prints its figures and exits 0', async (script, args, figure) => {
    const child = runEntry(script, { REDIS_URL: process.env.TEST_REDIS_URL ?? 'redis://127.0.0.1:6379' }, args);
    expect(await child.exited).toEqual({ code: 0, signal: null });
    expect(child.output.join('\n')).toMatch(figure);
  }, 30_000);
});
