import cliProgress from 'cli-progress';
import type { Command } from 'commander';
import { readBatchFile } from './batch-file.js';
import { apiOf, type Api, type Batch, type Counts, type Job } from './client.js';
import { batchSummary, EXIT_FAILED, EXIT_OK, print, printJson, table, wantsJson } from './output.js';

interface BatchOptions {
  callbackUrl?: string;
  idempotencyKey?: string;
  progress: boolean;
}

type FailedJob = Job & { batch_index: number };

interface Progress {
  update(counts: Counts): void;
  stop(): void;
}

export function registerBatch(program: Command): void {
  program
    .command('batch')
    .description('Upload many keys (POST /api/v1/cckm/aws/upload-key/batch), follow them, list the failures.')
    .argument('<file>', 'a JSON array of upload-key bodies, or a .csv file with a header row of field names')
    .option('--callback-url <url>', 'URL told when the batch ends')
    .option('--idempotency-key <key>', 'the same key and body answer the same batch')
    .option('--no-progress', 'no progress bar (there is none either when stderr is not a terminal)')
    .action(async (file: string, opts: BatchOptions, cmd: Command) => {
      const api = apiOf(cmd);
      const created = await submit(api, readBatchFile(file), opts);
      console.error(`batch ${created.id}: ${created.total} jobs`);
      const progress = opts.progress && process.stderr.isTTY ? progressBar(created) : undefined;
      const batch = await followBatch(api, created.id, (counts) => progress?.update(counts)).finally(() => progress?.stop());
      const failures = await failedJobs(api, batch.id);
      if (wantsJson(cmd)) printJson({ batch, failures });
      else printReport(batch, failures);
      process.exitCode = batch.counts.failed + batch.counts.canceled > 0 ? EXIT_FAILED : EXIT_OK;
    });
}

async function submit(api: Api, items: unknown[], opts: BatchOptions): Promise<Batch> {
  const headers: Record<string, string> = {};
  if (opts.idempotencyKey !== undefined) headers['idempotency-key'] = opts.idempotencyKey;
  const body = { items, ...(opts.callbackUrl !== undefined ? { callback_url: opts.callbackUrl } : {}) };
  return (await api.send('POST', '/api/v1/cckm/aws/upload-key/batch', { body, headers })).body as Batch;
}

const finished = (c: Counts) => c.succeeded + c.failed + c.canceled;

function progressBar(batch: Batch): Progress {
  const bar = new cliProgress.SingleBar(
    { stream: process.stderr, hideCursor: true, format: '{bar} {value}/{total} | {succeeded} succeeded, {failed} failed, {retrying} retrying' },
    cliProgress.Presets.shades_classic,
  );
  bar.start(batch.total, finished(batch.counts), batch.counts);
  return { update: (counts) => bar.update(finished(counts), counts), stop: () => bar.stop() };
}

/**
 * Follows the batch's event stream until `completed`; answers the final batch resource. When the stream
 * breaks or the server ends it early, the batch resource decides: completed ends here, else EventSource
 * reconnects (with Last-Event-ID), unless it has given up (e.g. on a non-200 answer).
 */
export function followBatch(api: Api, id: string, onCounts: (counts: Counts) => void): Promise<Batch> {
  return new Promise((resolve, reject) => {
    const events = api.events(`/api/v1/batches/${encodeURIComponent(id)}/events`);
    const finish = (batch: Batch) => {
      events.close();
      onCounts(batch.counts);
      resolve(batch);
    };
    const fail = (err: unknown) => {
      events.close();
      reject(err instanceof Error ? err : new Error(String(err)));
    };
    const data = <T>(event: MessageEvent) => JSON.parse(String(event.data)) as T;
    events.addEventListener('snapshot', (e) => onCounts(data<Batch>(e).counts));
    events.addEventListener('progress', (e) => onCounts(data<{ counts: Counts }>(e).counts));
    events.addEventListener('completed', (e) => finish(data<Batch>(e)));
    events.addEventListener('error', (e) => {
      api.get<Batch>(`/api/v1/batches/${encodeURIComponent(id)}`).then((batch) => {
        if (batch.status === 'completed') finish(batch);
        else if (events.readyState === events.CLOSED) fail(`The batch's event stream failed: ${e.message ?? 'closed'}.`);
      }, fail);
    });
  });
}

async function failedJobs(api: Api, id: string): Promise<FailedJob[]> {
  const jobs: FailedJob[] = [];
  let cursor: string | null = null;
  do {
    const query = new URLSearchParams({ status: 'failed', limit: '500', ...(cursor !== null ? { cursor } : {}) });
    const page: { jobs: FailedJob[]; next_cursor: string | null } = await api.get(`/api/v1/batches/${encodeURIComponent(id)}/jobs?${query}`);
    jobs.push(...page.jobs);
    cursor = page.next_cursor;
  } while (cursor !== null);
  return jobs;
}

function printReport(batch: Batch, failures: FailedJob[]): void {
  print(batchSummary(batch));
  if (failures.length === 0) return;
  const rows = failures.map((j) => [String(j.batch_index), j.id, j.error?.code ?? '-', j.error?.message ?? '']);
  print(table([['INDEX', 'JOB', 'ERROR', 'MESSAGE'], ...rows]));
}
