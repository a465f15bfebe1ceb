import type { Command } from 'commander';
import { apiOf, type Batch, type Job } from './client.js';
import { batchSummary, jobSummary, print, printJson, wantsJson } from './output.js';

export function registerStatus(program: Command): void {
  program
    .command('status')
    .description('Show a job (GET /api/v1/jobs/{id}) or, with --batch, a batch (GET /api/v1/batches/{id}).')
    .argument('<id>', 'job or batch id')
    .option('--batch', 'the id is a batch id')
    .action(async (id: string, opts: { batch?: true }, cmd: Command) => {
      const api = apiOf(cmd);
      const path = `/api/v1/${opts.batch ? 'batches' : 'jobs'}/${encodeURIComponent(id)}`;
      const resource = await api.get<Job | Batch>(path);
      if (wantsJson(cmd)) printJson(resource);
      else print(opts.batch ? batchSummary(resource as Batch) : jobSummary(resource as Job));
    });
}
