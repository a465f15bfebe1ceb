import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { queuedJobs, seedKms, seedLocalKey, startStack, type TestStack } from './helpers/stack.js';

const example = JSON.parse(readFileSync(new URL('./fixtures/spec-example-request.json', import.meta.url), 'utf8')) as Record<string, unknown>;

// A tiny rate: 2 requests at once, then one every 500 ms.
let stack: TestStack;
const upload = async (account: string, body: unknown = example) => stack.call('POST', '/api/v1/cckm/aws/upload-key', { token: await stack.token(account), body });
const batch = async (account: string) => stack.call('POST', '/api/v1/cckm/aws/upload-key/batch', { token: await stack.token(account), body: { items: [example] } });
const queued = () => queuedJobs(stack);

beforeAll(async () => {
  stack = await startStack({ name: 'ratelimit', worker: false, env: { INTAKE_RATE_PER_SECOND: '2', INTAKE_BURST: '2' } });
  for (const account of ['acme', 'globex', 'initech']) {
    const token = await stack.token(account);
    await seedKms(stack, token);
    await seedLocalKey(stack, token, 'test-key');
  }
});
afterAll(async () => {
  await stack?.close();
});

describe('intake rate limit per account', () => {
  it('when an account sends more intake requests than its burst, then the extra ones get 429 problem with Retry-After and enqueue nothing', async () => {
    expect((await upload('acme')).status).toBe(202);
    expect((await batch('acme')).status).toBe(202);
    const before = await queued();
    const limited = await upload('acme');
    expect(limited.status).toBe(429);
    expect(limited.headers.get('content-type')).toMatch(/^application\/problem\+json/);
    expect(limited.headers.get('retry-after')).toBe('1');
    expect(limited.body).toMatchObject({ status: 429, code: 'rate_limited' });
    expect((await batch('acme')).status).toBe(429);
    expect(await queued()).toBe(before);
  });

  it('when an account is limited, then other accounts and its other routes still answer', async () => {
    expect((await upload('globex')).status).toBe(202);
    const token = await stack.token('acme');
    expect((await stack.call('GET', '/api/v1/cckm/aws/kms', { token })).status).toBe(200);
    expect((await stack.call('POST', '/api/v1/cckm/aws/templates', { token, body: { name: 'not-limited', policy: {} } })).status).toBe(201);
  });

  it('when the bucket has had time to refill, then the account is accepted again', async () => {
    await new Promise((r) => setTimeout(r, 600));
    expect((await upload('acme')).status).toBe(202);
  });

  it('when many requests arrive at once, then exactly the burst passes (the bucket is updated atomically)', async () => {
    const answers = await Promise.all(Array.from({ length: 12 }, () => upload('initech', {})));
    const passed = answers.filter((a) => a.status !== 429);
    expect(passed.map((a) => a.status)).toEqual([400, 400]);
  });

  it("when the bucket is written, then it lives under the account's hash tag and expires", async () => {
    const key = `${stack.config.KEYFERRY_PREFIX}:acct:{acme}:ratelimit`;
    expect((await stack.redis.hkeys(key)).sort()).toEqual(['at', 'tokens']);
    const ttl = await stack.redis.pttl(key);
    expect(ttl).toBeGreaterThan(0);
    expect(ttl).toBeLessThanOrEqual(1001);
  });
});
