import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runEntry } from './helpers/child.js';
import { seedKms, seedLocalKey, startStack, waitForJob, type TestStack } from './helpers/stack.js';

const example = JSON.parse(readFileSync(new URL('./fixtures/spec-example-request.json', import.meta.url), 'utf8')) as Record<string, unknown>;

// The in-process stack seeds data and owns the emulator; the processes under test are real children
// sharing its Redis prefix and secrets.
let stack: TestStack;
let token: string;
let childEnv: Record<string, string>;

beforeAll(async () => {
  stack = await startStack({ name: 'shutdown', worker: false, env: { SSE_KEEPALIVE_MS: '100' } });
  token = await stack.token('acme');
  await seedKms(stack, token);
  await seedLocalKey(stack, token, 'test-key');
  childEnv = stack.childEnv({ LOG_LEVEL: 'info' });
});
afterAll(async () => {
  await stack?.close();
});

describe('event stream keep-alive', () => {
  it('when a watched job stays queued, then the stream sends its snapshot and then keep-alive comments', async () => {
    const res = await stack.call('POST', '/api/v1/cckm/aws/upload-key', { token, body: { ...example, aws_param: { Alias: 'keepalive-1' } } });
    const abort = new AbortController();
    const stream = await fetch(`${stack.api.url}/api/v1/jobs/${res.body.id}/events`, { headers: { authorization: `Bearer ${token}` }, signal: abort.signal });
    expect(stream.headers.get('content-type')).toMatch(/^text\/event-stream/);
    const reader = (stream.body as ReadableStream<Uint8Array>).getReader();
    let text = '';
    const until = Date.now() + 2000;
    while (Date.now() < until && (text.match(/: keep-alive/g) ?? []).length < 2) text += new TextDecoder().decode((await reader.read()).value);
    abort.abort();
    expect(text).toMatch(/^id: \S+\nevent: job\ndata: \{.*"status":"queued"/);
    expect((text.match(/: keep-alive/g) ?? []).length).toBeGreaterThanOrEqual(2);
    await stack.call('DELETE', `/api/v1/jobs/${res.body.id}`, { token });
  });
});

describe('graceful shutdown', () => {
  it('when the API gets SIGTERM during a request, then that request is answered, new ones are refused, and it exits 0', async () => {
    const api = runEntry('api/main.ts', childEnv);
    const { url } = (await api.waitForLog('api listening')) as { url: string };
    // No worker runs, so Prefer: wait=2 keeps this request in flight for 2 s.
    const inFlight = fetch(`${url}/api/v1/cckm/aws/upload-key`, {
      method: 'POST',
      headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json', prefer: 'wait=2' },
      body: JSON.stringify({ ...example, aws_param: { Alias: 'shutdown-api' } }),
    });
    await new Promise((r) => setTimeout(r, 300));
    api.proc.kill('SIGTERM');
    const res = await inFlight;
    expect(res.status).toBe(202);
    const job = (await res.json()) as { id: string };
    expect(await api.exited).toEqual({ code: 0, signal: null });
    await expect(fetch(`${url}/healthz`)).rejects.toThrow();
    // The accepted job is not lost: it is still queued for a worker.
    expect((await stack.call('GET', `/api/v1/jobs/${job.id}`, { token })).body.status).toBe('queued');
    await stack.call('DELETE', `/api/v1/jobs/${job.id}`, { token });
  });

  it('when a worker gets SIGTERM during a job, then the job finishes once and the worker exits 0', async () => {
    stack.emulator.setLatency(150);
    try {
      const worker = runEntry('worker/main.ts', childEnv);
      await worker.waitForLog('worker started');
      const res = await stack.call('POST', '/api/v1/cckm/aws/upload-key', { token, body: { ...example, aws_param: { Alias: 'shutdown-worker' } } });
      // Wait until the job is in the middle of the pipeline, then ask the worker to stop.
      for (let i = 0; i < 200; i++) {
        const j = await stack.call('GET', `/api/v1/jobs/${res.body.id}`, { token });
        if (j.body.step === 'create_alias' || j.body.step === 'get_import_params') break;
        await new Promise((r) => setTimeout(r, 20));
      }
      worker.proc.kill('SIGTERM');
      expect(await worker.exited).toEqual({ code: 0, signal: null });
      const job = await waitForJob(stack, token, res.body.id, 5000);
      expect(job).toMatchObject({ status: 'succeeded', attempts: 1 });
      const keys = stack.emulator.keys().filter((k) => k.tags.some((t) => t.TagValue === res.body.id));
      expect(keys.map((k) => k.keyState)).toEqual(['Enabled']);
    } finally {
      stack.emulator.setLatency(0);
    }
  });

  it('when a job outlasts the shutdown grace period, then the worker exits anyway and another worker finishes the job with one key', async () => {
    stack.emulator.setLatency(1500);
    try {
      const worker = runEntry('worker/main.ts', { ...childEnv, WORKER_SHUTDOWN_GRACE_MS: '300', WORKER_LOCK_DURATION_MS: '1000', WORKER_STALLED_INTERVAL_MS: '500' });
      await worker.waitForLog('worker started');
      const res = await stack.call('POST', '/api/v1/cckm/aws/upload-key', { token, body: { ...example, aws_param: { Alias: 'shutdown-grace' } } });
      for (let i = 0; i < 200; i++) {
        if ((await stack.call('GET', `/api/v1/jobs/${res.body.id}`, { token })).body.status === 'running') break;
        await new Promise((r) => setTimeout(r, 20));
      }
      const t0 = Date.now();
      worker.proc.kill('SIGTERM');
      expect(await worker.exited).toEqual({ code: 0, signal: null });
      expect(Date.now() - t0).toBeLessThan(1400); // it did not wait for the 1.5 s KMS call
      stack.emulator.setLatency(0);
      await stack.startWorker({ WORKER_LOCK_DURATION_MS: '1000', WORKER_STALLED_INTERVAL_MS: '500' });
      const job = await waitForJob(stack, token, res.body.id, 15_000);
      expect(job.status).toBe('succeeded');
      const keys = stack.emulator.keys().filter((k) => k.tags.some((t) => t.TagValue === res.body.id));
      expect(keys.map((k) => k.keyState)).toEqual(['Enabled']);
    } finally {
      stack.emulator.setLatency(0);
    }
  }, 30_000);
});
