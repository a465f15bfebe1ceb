import { CommanderError, type Command } from 'commander';
import { ApiProblem, UsageError, type Batch, type Job, type KeyResource } from './client.js';

export const EXIT_OK = 0;
export const EXIT_FAILED = 1;
export const EXIT_USAGE = 2;

export function print(text: string): void {
  process.stdout.write(`${text}\n`);
}

export function printJson(value: unknown): void {
  print(JSON.stringify(value, null, 2));
}

/** Whether the global --json option was given. */
export function wantsJson(cmd: Command): boolean {
  return cmd.optsWithGlobals<{ json?: boolean }>().json === true;
}

export function jobSummary(job: Job): string {
  const attempts = job.max_attempts === undefined ? `${job.attempts}` : `${job.attempts}/${job.max_attempts}`;
  const line = `job ${job.id} ${job.status} (step ${job.step ?? '-'}, attempts ${attempts})`;
  return job.error ? `${line}\n  ${job.error.code}: ${job.error.message}` : line;
}

export function keySummary(key: KeyResource): string {
  const aliases = key.aws_param.Alias?.length ? ` ${key.aws_param.Alias.join(', ')}` : '';
  return `key ${key.id} ${key.aws_param.KeyState ?? ''}${aliases}\n  ${key.aws_param.Arn ?? ''}`;
}

export function batchSummary(batch: Batch): string {
  const c = batch.counts;
  return (
    `batch ${batch.id} ${batch.status}: ${batch.total} jobs, ${c.succeeded} succeeded, ${c.failed} failed, ` +
    `${c.canceled} canceled, ${c.queued + c.running + c.retrying} pending`
  );
}

/** Rows as columns padded to their widest cell. */
export function table(rows: string[][]): string {
  const widths = rows[0]?.map((_, i) => Math.max(...rows.map((r) => r[i]?.length ?? 0))) ?? [];
  return rows.map((r) => r.map((cell, i) => cell.padEnd(widths[i] ?? 0)).join('  ').trimEnd()).join('\n');
}

/** Writes what went wrong to stderr and answers the exit code. */
export function reportError(err: unknown): number {
  if (err instanceof CommanderError) return err.exitCode === 0 ? EXIT_OK : EXIT_USAGE; // commander has printed it
  if (err instanceof UsageError) {
    console.error(`error: ${err.message}`);
    return EXIT_USAGE;
  }
  if (err instanceof ApiProblem) {
    const p = err.problem;
    console.error(`error: ${p.detail} (${p.status} ${p.code})`);
    for (const e of p.errors ?? []) console.error(`  ${e.path}: ${e.message}`);
    return EXIT_FAILED;
  }
  console.error(`error: ${err instanceof Error ? err.message : String(err)}`);
  return EXIT_FAILED;
}
