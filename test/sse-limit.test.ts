import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { seedKms, seedLocalKey, startStack, type TestStack } from './helpers/stack.js';

const example = JSON.parse(readFileSync(new URL('./fixtures/spec-example-request.json', import.meta.url), 'utf8')) as Record<string, unknown>;

let stack: TestStack;
const open: AbortController[] = [];

beforeAll(async () => {
  // No worker: the jobs stay queued, so their event streams stay open until the client goes.
  stack = await startStack({ name: 'sse-limit', worker: false, env: { SSE_MAX_STREAMS_PER_ACCOUNT: '2', SSE_KEEPALIVE_MS: '200' } });
});
afterAll(async () => {
  for (const c of open) c.abort();
  await stack?.close();
});

/** Uploads for `account` and returns the new job's id. */
async function queuedJob(account: string, alias: string): Promise<{ token: string; id: string }> {
  const token = await stack.token(account);
  await seedKms(stack, token);
  await seedLocalKey(stack, token, 'test-key');
  const res = await stack.call('POST', '/api/v1/cckm/aws/upload-key', { token, body: { ...example, aws_param: { Alias: alias } } });
  expect(res.status).toBe(202);
  return { token, id: res.body.id as string };
}

/** Opens the job's event stream; the status, and an abort that closes it. */
async function stream(token: string, id: string) {
  const ctl = new AbortController();
  open.push(ctl);
  const res = await fetch(`${stack.api.url}/api/v1/jobs/${id}/events`, { headers: { authorization: `Bearer ${token}` }, signal: ctl.signal });
  if (res.status !== 200) return { status: res.status, type: res.headers.get('content-type'), body: (await res.json()) as Record<string, unknown>, close: () => ctl.abort() };
  // Read on in the background, as a client does, until closed.
  void res.body?.pipeTo(new WritableStream()).catch(() => undefined);
  return { status: res.status, type: res.headers.get('content-type'), body: undefined, close: () => ctl.abort() };
}

describe('event streams per account', () => {
  it('when an account holds as many streams open as it may, then the next answers 429 problem+json; another account is not held back, and a stream closed frees a place', async () => {
    const acme = await queuedJob('acme', 'sse-limit-acme');
    const first = await stream(acme.token, acme.id);
    const second = await stream(acme.token, acme.id);
    expect([first.status, second.status]).toEqual([200, 200]);
    const third = await stream(acme.token, acme.id);
    expect(third).toMatchObject({ status: 429, type: expect.stringMatching(/^application\/problem\+json/), body: { code: 'too_many_streams' } });

    const globex = await queuedJob('globex', 'sse-limit-globex');
    expect((await stream(globex.token, globex.id)).status).toBe(200);

    first.close();
    for (let i = 0; ; i++) {
      const again = await stream(acme.token, acme.id);
      if (again.status === 200) break;
      expect(again.status).toBe(429);
      if (i > 50) throw new Error('the closed stream never freed its place');
      await new Promise((r) => setTimeout(r, 50));
    }
  });
});
