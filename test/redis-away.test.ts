import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startApi, type ApiServer } from '../api/server.js';
import { signToken } from '../shared/auth.js';
import { loadConfig } from '../shared/config.js';
import { createLogger } from '../shared/logger.js';
import { testEnv } from './helpers/stack.js';

const example = JSON.parse(readFileSync(new URL('./fixtures/spec-example-request.json', import.meta.url), 'utf8')) as Record<string, unknown>;

// Nothing listens on port 1: every Redis command of the API fails.
const config = loadConfig(testEnv('away', { REDIS_URL: 'redis://127.0.0.1:1' }));
let api: ApiServer;
let closed = false;
let token: string;

beforeAll(async () => {
  api = await startApi(config, createLogger('silent', 'keyferry-test'));
  token = await signToken({ secret: config.JWT_SECRET, account: 'acme' });
});
afterAll(async () => {
  if (api && !closed) await api.close();
});

/** The answer and how long it took; a hang fails the request after 10 s. */
async function timed(method: string, path: string, body?: unknown) {
  const started = Date.now();
  const res = await fetch(`${api.url}${path}`, {
    method,
    headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
    ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
    signal: AbortSignal.timeout(10_000),
  });
  return { status: res.status, type: res.headers.get('content-type'), retryAfter: res.headers.get('retry-after'), body: (await res.json()) as { status: number; code: string }, ms: Date.now() - started };
}

describe('Redis unreachable', () => {
  it('when an upload is posted, then 503 problem with Retry-After within 2 s, every time', async () => {
    for (let i = 0; i < 4; i++) {
      const res = await timed('POST', '/api/v1/cckm/aws/upload-key', example);
      expect(res).toMatchObject({ status: 503, retryAfter: '5', body: { status: 503, code: 'service_unavailable' } });
      expect(res.type).toMatch(/^application\/problem\+json/);
      expect(res.ms).toBeLessThan(2000);
    }
  });

  it('when resources are read, then 503 problem within 2 s', async () => {
    for (const path of ['/api/v1/jobs/some-id', '/api/v1/cckm/aws/kms', '/api/v1/batches/some-id/events']) {
      const res = await timed('GET', path);
      expect(res, path).toMatchObject({ status: 503, body: { status: 503 } });
      expect(res.ms).toBeLessThan(2000);
    }
  });

  it('when readiness is asked, then 503 problem; liveness still answers 200', async () => {
    const ready = await timed('GET', '/readyz');
    expect(ready).toMatchObject({ status: 503, body: { status: 503, code: 'not_ready' } });
    expect(ready.type).toMatch(/^application\/problem\+json/);
    expect(ready.ms).toBeLessThan(2000);
    expect((await timed('GET', '/healthz')).status).toBe(200);
  });

  it('when the API is closed, then close() returns although its connections never came up', async () => {
    const started = Date.now();
    closed = true;
    await api.close();
    expect(Date.now() - started).toBeLessThan(2000);
  });
});
