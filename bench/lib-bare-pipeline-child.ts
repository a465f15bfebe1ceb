/**
 * The bare KMS upload sequence (bench/lib-bench.ts bareUpload) in a process of its own, for
 * bench/pipeline-instructions.ts, which runs it under callgrind. Settings from the environment: BENCH_EMULATOR_URL,
 * BENCH_REGION, BENCH_N, BENCH_WARMUP, BENCH_CONCURRENCY, BENCH_KEY_SPEC, BENCH_TIMEOUT_MS. Runs the warm-up,
 * prints `warm`; on the line `go` (stdin) runs N uploads, prints `done`; on `exit`, exits.
 */
import { randomBytes } from 'node:crypto';
import { createInterface } from 'node:readline';
import { EMULATOR_ACCESS_KEY, EMULATOR_SECRET_KEY } from '../test/helpers/stack.js';
import { bareKmsClient, bareUpload, BENCH_TAGS, intParam, runPool, type BareUpload } from './lib-bench.js';

const client = bareKmsClient({
  region: process.env.BENCH_REGION ?? 'eu-west-1',
  endpoint: process.env.BENCH_EMULATOR_URL ?? '',
  accessKeyId: EMULATOR_ACCESS_KEY,
  secretAccessKey: EMULATOR_SECRET_KEY,
  timeoutMs: intParam(undefined, 'BENCH_TIMEOUT_MS', 15_000),
});
const N = intParam(undefined, 'BENCH_N', 300);
const CONCURRENCY = intParam(undefined, 'BENCH_CONCURRENCY', 8);
const material = randomBytes(32);
const run = (phase: string, n: number) =>
  runPool(n, CONCURRENCY, (i) =>
    bareUpload(client, { alias: `bare-${phase}-${i}`, jobTag: `${randomBytes(16).toString('hex')}.${i}`, material, keySpec: (process.env.BENCH_KEY_SPEC ?? 'RSA_2048') as BareUpload['keySpec'], tags: BENCH_TAGS }),
  );

await run('warm', intParam(undefined, 'BENCH_WARMUP', 300, 0));
console.log('warm');
for await (const line of createInterface({ input: process.stdin })) {
  if (line === 'go') {
    await run('counted', N);
    console.log('done');
  } else if (line === 'exit') {
    client.destroy();
    process.exit(0);
  }
}
