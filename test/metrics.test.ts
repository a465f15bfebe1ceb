import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { seedKms, seedLocalKey, startStack, waitForJob, type TestStack } from './helpers/stack.js';

const example = JSON.parse(readFileSync(new URL('./fixtures/spec-example-request.json', import.meta.url), 'utf8')) as Record<string, unknown>;

let stack: TestStack;
let token: string;

interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

/** The samples of a Prometheus text exposition (comments skipped). */
function parseMetrics(text: string): Sample[] {
  const samples: Sample[] = [];
  for (const line of text.split('\n')) {
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (!m) continue;
    const labels: Record<string, string> = {};
    for (const l of (m[2] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[l[1] as string] = l[2] as string;
    samples.push({ name: m[1] as string, labels, value: Number(m[3]) });
  }
  return samples;
}

/** The sum of the samples named `name` whose labels include `labels`. */
function total(samples: Sample[], name: string, labels: Record<string, string> = {}): number {
  return samples
    .filter((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v))
    .reduce((sum, s) => sum + s.value, 0);
}

async function scrape(url: string): Promise<{ contentType: string | null; samples: Sample[]; text: string }> {
  const res = await fetch(url);
  expect(res.status).toBe(200);
  const text = await res.text();
  return { contentType: res.headers.get('content-type'), samples: parseMetrics(text), text };
}

beforeAll(async () => {
  stack = await startStack({ name: 'metrics' });
  token = await stack.token('metrics');
  await seedKms(stack, token);
  await seedLocalKey(stack, token, 'test-key');

  const ok = await stack.call('POST', '/api/v1/cckm/aws/upload-key', { token, body: { ...example, aws_param: { Alias: 'metrics-ok' } } });
  expect(ok.status).toBe(202);
  expect(await waitForJob(stack, token, ok.body.id)).toMatchObject({ status: 'succeeded' });

  stack.emulator.injectFault({ op: 'CreateKey', error: 'AccessDeniedException', count: 1 });
  const denied = await stack.call('POST', '/api/v1/cckm/aws/upload-key', { token, body: { ...example, aws_param: { Alias: 'metrics-denied' } } });
  expect(denied.status).toBe(202);
  expect(await waitForJob(stack, token, denied.body.id)).toMatchObject({ status: 'failed', error: { code: 'aws_access_denied' } });
});
afterAll(async () => {
  await stack?.close();
});

describe('Prometheus metrics', () => {
  it('when the API is scraped without a token, then it answers the text format with intake, queue and default metrics', async () => {
    const { contentType, samples, text } = await scrape(`${stack.api.url}/metrics`);
    expect(contentType).toMatch(/^text\/plain; version=0\.0\.4/);
    expect(text).toContain('# TYPE keyferry_jobs_accepted_total counter');
    expect(total(samples, 'keyferry_jobs_accepted_total', { kind: 'single' })).toBe(2);
    expect(total(samples, 'keyferry_jobs_accepted_total', { kind: 'batch' })).toBe(0);
    // The queue gauge is read from BullMQ at scrape time, for both queues.
    expect(text).toContain('# TYPE keyferry_queue_jobs gauge');
    const queues = samples.filter((s) => s.name === 'keyferry_queue_jobs');
    expect(queues.map((s) => s.labels.queue)).toEqual(expect.arrayContaining(['upload-key']));
    expect(queues.some((s) => s.labels.state === 'waiting')).toBe(true);
    expect(total(samples, 'keyferry_queue_jobs', { queue: 'upload-key', state: 'active' })).toBe(0);
    // Default Node.js metrics, prefixed.
    expect(total(samples, 'keyferry_process_cpu_user_seconds_total')).toBeGreaterThan(0);
    expect(samples.some((s) => s.name === 'keyferry_nodejs_heap_size_total_bytes')).toBe(true);
    // Bounded labels: no job ids or URLs anywhere.
    expect(text).not.toMatch(/[0-9a-f]{8}-[0-9a-f]{4}-/);
    expect(text).not.toContain('http://');
  });

  it('when the worker is scraped at its metricsUrl, then jobs, steps, KMS calls and durations are counted', async () => {
    const url = stack.worker?.metricsUrl as string;
    expect(url).toMatch(/^http:\/\/127\.0\.0\.1:\d+\/metrics$/);
    const { samples, text } = await scrape(url);

    expect(total(samples, 'keyferry_jobs_finished_total', { status: 'succeeded', code: '' })).toBeGreaterThanOrEqual(1);
    expect(total(samples, 'keyferry_jobs_finished_total', { status: 'failed', code: 'aws_access_denied' })).toBe(1);
    expect(total(samples, 'keyferry_job_duration_seconds_count')).toBe(2);
    expect(total(samples, 'keyferry_job_duration_seconds_sum')).toBeGreaterThan(0);

    expect(total(samples, 'keyferry_kms_requests_total', { operation: 'CreateKey', outcome: 'ok', code: '' })).toBeGreaterThanOrEqual(1);
    expect(total(samples, 'keyferry_kms_requests_total', { operation: 'CreateKey', outcome: 'error', code: 'AccessDeniedException' })).toBe(1);
    expect(total(samples, 'keyferry_kms_requests_total', { operation: 'ImportKeyMaterial', outcome: 'ok' })).toBeGreaterThanOrEqual(1);
    expect(total(samples, 'keyferry_kms_request_duration_seconds_count', { operation: 'CreateKey' })).toBe(
      total(samples, 'keyferry_kms_requests_total', { operation: 'CreateKey' }),
    );

    for (const step of ['resolve', 'create_key', 'import', 'record']) {
      expect(total(samples, 'keyferry_step_duration_seconds_count', { step }), step).toBeGreaterThanOrEqual(1);
    }
    expect(text).toContain('# TYPE keyferry_quota_waits_total counter');
    expect(text).toContain('# TYPE keyferry_webhook_deliveries_total counter');
    expect(samples.some((s) => s.name === 'keyferry_process_resident_memory_bytes' || s.name === 'keyferry_nodejs_heap_size_used_bytes')).toBe(true);
  });

  it('when anything but GET /metrics is asked of the worker listener, then 404', async () => {
    const url = new URL(stack.worker?.metricsUrl as string);
    const res = await fetch(new URL('/other', url));
    expect(res.status).toBe(404);
    await res.body?.cancel();
  });
});
