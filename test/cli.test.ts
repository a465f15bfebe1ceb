import { spawn } from 'node:child_process';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { followBatch } from '../api/cli/batch.js';
import { parseCsv, readBatchFile } from '../api/cli/batch-file.js';
import { Api, ApiProblem } from '../api/cli/client.js';
import { seedKms, seedLocalKey, startStack, waitForJob, type TestStack } from './helpers/stack.js';

let stack: TestStack;
let token: string;
let dir: string;

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs the CLI as a user would, configured through KEYFERRY_URL and KEYFERRY_TOKEN. */
function cli(args: string[], env: Record<string, string> = {}): Promise<Run> {
  const child = spawn(process.execPath, ['--import', 'tsx', 'api/cli/main.ts', ...args], {
    cwd: join(import.meta.dirname, '..'),
    env: { ...process.env, KEYFERRY_URL: stack.api.url, KEYFERRY_TOKEN: token, ...env },
  });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  return new Promise((resolve, reject) => {
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}

function file(name: string, content: string): string {
  const path = join(dir, name);
  writeFileSync(path, content);
  return path;
}

beforeAll(async () => {
  stack = await startStack({ name: 'cli' });
  token = await stack.token('kylo');
  await seedKms(stack, token);
  await seedLocalKey(stack, token, 'test-key');
  dir = mkdtempSync(join(tmpdir(), 'keyferry-cli-'));
});
afterAll(async () => {
  rmSync(dir, { recursive: true, force: true });
  await stack?.close();
});

describe('keyferry upload, status, token', () => {
  it('when upload --wait succeeds, then it exits 0 and prints the key resource with the flags mapped', async () => {
    const run = await cli(['upload', '--source-key-identifier', 'test-key', '--region', 'ap-south-1', '--kms', 'kms', '--alias', 'cli-key-1', '--tag', 'team=payments', '--key-user', 'alice', '--wait', '--json']);
    expect(run.stderr).toBe('');
    expect(run.code).toBe(0);
    const key = JSON.parse(run.stdout);
    expect(key.aws_param).toMatchObject({ KeyState: 'Enabled', Alias: ['alias/cli-key-1'], Tags: [{ TagKey: 'team', TagValue: 'payments' }] });
    expect(key.aws_param.Policy.Statement.map((s: { Sid: string }) => s.Sid)).toContain('Allow use of the key');
  });

  it('when a field is invalid, then it exits 1 and prints the problem and the field path', async () => {
    const run = await cli(['upload', '--source-key-identifier', 'test-key', '--region', 'ap-south-1', '--kms', 'kms', '--tag', 'team=not allowed']);
    expect(run.code).toBe(1);
    expect(run.stderr).toContain('(400 validation_failed)');
    expect(run.stderr).toMatch(/aws_param\.Tags\[0\]\.TagValue: /);
  });

  it('when a required flag is missing, then it exits 2 naming the flag', async () => {
    const run = await cli(['upload', '--region', 'ap-south-1', '--kms', 'kms']);
    expect(run.code).toBe(2);
    expect(run.stderr).toContain('--source-key-identifier');
  });

  it('when status is asked for a job, then it prints the job summary', async () => {
    const res = await stack.call('POST', '/api/v1/cckm/aws/upload-key', { token, body: { source_key_identifier: 'test-key', region: 'us-east-1', kms: 'kms' } });
    const jobId: string = (await waitForJob(stack, token, res.body.id)).id;
    const run = await cli(['status', jobId]);
    expect(run.code).toBe(0);
    expect(run.stdout).toMatch(new RegExp(`^job ${jobId} succeeded \\(step record, attempts 1/\\d+\\)$`, 'm'));
  });

  it('when token is run with JWT_SECRET, then it prints a JWT the API accepts for that account', async () => {
    const run = await cli(['token', '--account', 'kylo', '--ttl', '120'], { JWT_SECRET: stack.config.JWT_SECRET });
    expect(run.code).toBe(0);
    const jwt = run.stdout.trim();
    expect(jwt).toMatch(/^[\w-]+\.[\w-]+\.[\w-]+$/);
    const res = await stack.call('GET', '/api/v1/cckm/aws/kms/kms', { token: jwt });
    expect(res.status).toBe(200);
  });
});

describe('keyferry batch', () => {
  it('when one item of a JSON batch fails, then it exits 1 and the failure table names its index and code', async () => {
    const items = [
      { source_key_identifier: 'test-key', region: 'ap-south-1', kms: 'kms' },
      { source_key_identifier: 'no-such-key', region: 'ap-south-1', kms: 'kms' },
      { source_key_identifier: 'test-key', region: 'us-east-1', kms: 'kms' },
    ];
    const run = await cli(['batch', file('batch.json', JSON.stringify(items))]);
    expect(run.code).toBe(1);
    expect(run.stdout).toMatch(/^batch \S+ completed: 3 jobs, 2 succeeded, 1 failed, 0 canceled, 0 pending$/m);
    expect(run.stdout).toMatch(/^1\s+\S+\s+source_key_not_found\s+\S/m);
  });

  it('when a CSV batch succeeds, then it exits 0 and the columns reach the uploaded keys', async () => {
    const csv = 'source_key_identifier,region,kms,alias,description,tags\r\n' +
      'test-key,ap-south-1,kms,csv-key-1,"first, with a comma",team=payments;env=prod\r\n' +
      'test-key,us-east-1,kms,csv-key-2,,\r\n';
    const run = await cli(['batch', file('batch.csv', csv), '--json', '--no-progress']);
    expect(run.code).toBe(0);
    const { batch, failures } = JSON.parse(run.stdout);
    expect(batch).toMatchObject({ status: 'completed', total: 2, counts: { succeeded: 2 } });
    expect(failures).toEqual([]);
    const page = await stack.call('GET', `/api/v1/batches/${batch.id}/jobs?status=succeeded`, { token });
    expect(page.body.jobs.map((j: any) => j.result.aws_param)).toEqual([
      expect.objectContaining({ Alias: ['alias/csv-key-1'], Description: 'first, with a comma', Tags: [{ TagKey: 'team', TagValue: 'payments' }, { TagKey: 'env', TagValue: 'prod' }] }),
      expect.objectContaining({ Alias: ['alias/csv-key-2'], Tags: [] }),
    ]);
  });
});

describe('readBatchFile', () => {
  it('when a CSV names an HSM or KMIP source, then the items carry source_key_tier and source_connection', () => {
    const csv = 'source_key_identifier,region,kms,source_key_tier,source_connection\n' + 'dek-1,ap-south-1,kms,hsm-luna,luna-prod\n' + 'test-key,ap-south-1,kms,,\n';
    expect(readBatchFile(file('sources.csv', csv))).toEqual([
      { source_key_identifier: 'dek-1', region: 'ap-south-1', kms: 'kms', source_key_tier: 'hsm-luna', source_connection: 'luna-prod' },
      { source_key_identifier: 'test-key', region: 'ap-south-1', kms: 'kms' },
    ]);
  });
});

describe('parseCsv', () => {
  it('when fields are quoted, then commas, doubled quotes and line breaks stay inside them', () => {
    expect(parseCsv('a,b\n"x, y","say ""hi""\nthere"\r\nlast,\n')).toEqual([
      ['a', 'b'],
      ['x, y', 'say "hi"\nthere'],
      ['last', ''],
    ]);
  });
});

describe('followBatch', () => {
  const batch = (status: string, succeeded: number) =>
    JSON.stringify({ id: 'b1', status, total: 2, counts: { queued: 2 - succeeded, running: 0, retrying: 0, succeeded, failed: 0, canceled: 0 } });
  const servers: Server[] = [];
  afterAll(() => servers.forEach((s) => s.close()));

  /** A fake API: its event stream sends a snapshot and closes without `completed` (reconnect delay 50 ms), or answers 404. */
  async function fakeApi(found: boolean): Promise<{ api: Api; streams: () => number }> {
    let streams = 0;
    const server = createServer((req, res) => {
      const isStream = req.url === '/api/v1/batches/b1/events';
      if (isStream) streams++;
      if (!found) return void res.writeHead(404, { 'content-type': 'application/problem+json' }).end('{"status":404,"code":"not_found","detail":"No batch."}');
      if (!isStream) return void res.writeHead(200, { 'content-type': 'application/json' }).end(batch('completed', 2));
      res.writeHead(200, { 'content-type': 'text/event-stream' }).end(`retry: 50\nid: 1\nevent: snapshot\ndata: ${batch('running', 1)}\n\n`);
    });
    servers.push(server);
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    return { api: new Api(`http://127.0.0.1:${(server.address() as AddressInfo).port}`, 't'), streams: () => streams };
  }

  it('when the stream closes before completed, then the completed batch resource ends it and no stream is reopened', async () => {
    const fake = await fakeApi(true);
    const seen: number[] = [];
    const final = await followBatch(fake.api, 'b1', (c) => seen.push(c.succeeded));
    const streams = fake.streams();
    await new Promise((r) => setTimeout(r, 300)); // well past the reconnect delay
    expect(final.status).toBe('completed');
    expect(seen.at(-1)).toBe(2);
    expect(fake.streams()).toBe(streams);
  });

  it('when the stream answers an error status, then it rejects with the problem instead of hanging', async () => {
    const fake = await fakeApi(false);
    await expect(followBatch(fake.api, 'b1', () => {})).rejects.toBeInstanceOf(ApiProblem);
  });
});
