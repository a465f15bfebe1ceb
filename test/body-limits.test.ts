import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { queuedJobs, seedKms, seedLocalKey, startStack, type TestStack } from './helpers/stack.js';

const example = JSON.parse(readFileSync(new URL('./fixtures/spec-example-request.json', import.meta.url), 'utf8')) as Record<string, unknown>;
const MiB = 1024 * 1024;

let stack: TestStack;
let token: string;
const queued = () => queuedJobs(stack);
/** A JSON body of exactly `bytes` bytes: `{"pad":"xxx…"}`. */
const padded = (bytes: number) => JSON.stringify({ pad: 'x'.repeat(bytes - '{"pad":""}'.length) });
const post = (path: string, raw: string, t: string | null = token) =>
  stack.call('POST', path, { ...(t ? { token: t } : {}), raw, headers: { 'content-type': 'application/json' } });

beforeAll(async () => {
  stack = await startStack({ name: 'limits', worker: false });
  token = await stack.token('acme');
  await seedKms(stack, token);
  await seedLocalKey(stack, token, 'test-key');
});
afterAll(async () => {
  await stack?.close();
});

describe('body size limits', () => {
  it('when a single request body exceeds 1 MiB, then every route answers 413 problem and nothing is enqueued', async () => {
    const before = await queued();
    for (const path of ['/api/v1/cckm/aws/upload-key', '/api/v1/cckm/aws/kms', '/api/v1/cckm/aws/templates', '/api/v1/vault/keys2', '/api/v1/webhooks/secret']) {
      const res = await post(path, padded(MiB + 1));
      expect(res.status, path).toBe(413);
      expect(res.headers.get('content-type')).toMatch(/^application\/problem\+json/);
      expect(res.body).toMatchObject({ status: 413, code: 'body_too_large' });
    }
    expect(await queued()).toBe(before);
  });

  it('when a body is exactly 1 MiB, then it is read and validated (400, not 413)', async () => {
    const res = await post('/api/v1/cckm/aws/upload-key', padded(MiB));
    expect(res.status).toBe(400);
    expect(res.body.errors).toContainEqual({ path: 'pad', message: 'Unknown field.' });
  });

  it('when an over-limit body comes chunked, without Content-Length, then 413 problem', async () => {
    const chunk = new TextEncoder().encode(' '.repeat(64 * 1024));
    let sent = 0;
    const body = new ReadableStream<Uint8Array>({
      pull(controller) {
        if (sent >= 2 * MiB) return controller.close();
        controller.enqueue(sent === 0 ? new TextEncoder().encode('{"pad":"') : chunk);
        sent += chunk.length;
      },
    });
    const res = await fetch(`${stack.api.url}/api/v1/cckm/aws/upload-key`, {
      method: 'POST',
      headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
      body,
      duplex: 'half',
    } as RequestInit);
    expect(res.status).toBe(413);
    expect(await res.json()).toMatchObject({ status: 413 });
  });

  it('when a batch body is between 1 and 16 MiB, then it is accepted', async () => {
    const before = await queued();
    const items = Array.from({ length: 3000 }, (_, i) => ({ ...example, aws_param: { Alias: `big-batch-${i}`, Description: 'd'.repeat(600) } }));
    const raw = JSON.stringify({ items });
    expect(raw.length).toBeGreaterThan(MiB);
    const res = await post('/api/v1/cckm/aws/upload-key/batch', raw);
    expect(res.status).toBe(202);
    expect(await queued()).toBe(before + 3000);
  });

  it('when a batch body exceeds 16 MiB, then 413 problem and nothing is enqueued', async () => {
    const before = await queued();
    const res = await post('/api/v1/cckm/aws/upload-key/batch', padded(16 * MiB + 1));
    expect(res.status).toBe(413);
    expect(res.headers.get('content-type')).toMatch(/^application\/problem\+json/);
    expect(res.body).toMatchObject({ status: 413, code: 'body_too_large' });
    expect(await queued()).toBe(before);
  });

  it('when a caller without a valid token sends a large body, then 401 before the body is read', async () => {
    const res = await post('/api/v1/cckm/aws/upload-key/batch', padded(16 * MiB + 1), null);
    expect(res.status).toBe(401);
    const malformed = await post('/api/v1/cckm/aws/upload-key', '{"not json', 'not-a-token');
    expect(malformed.status).toBe(401);
  });
});
