import { readFileSync } from 'node:fs';
import { Webhook } from 'standardwebhooks';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Receiver } from './helpers/receiver.js';
import { seedKms, seedLocalKey, startStack, waitForJob, type TestStack } from './helpers/stack.js';

const example = JSON.parse(readFileSync(new URL('./fixtures/spec-example-request.json', import.meta.url), 'utf8')) as Record<string, unknown>;

// The whole path: API intake with callback_url → upload worker → webhook queue → delivery to a receiver.
let stack: TestStack;
let token: string;
let secret: string;
const receiver = new Receiver();

/** Waits until `n` deliveries reached `path`, then a little longer to catch duplicates. */
async function deliveriesAt(path: string, n: number, settleMs = 300) {
  const deadline = Date.now() + 20_000;
  while (receiver.at(path).length < n && Date.now() < deadline) await new Promise((r) => setTimeout(r, 25));
  await new Promise((r) => setTimeout(r, settleMs));
  return receiver.at(path);
}

const verified = (r: { body: string; headers: Record<string, string> }) => new Webhook(secret).verify(r.body, r.headers) as { type: string; data: any };

beforeAll(async () => {
  await receiver.start();
  stack = await startStack({ name: 'callbacks', env: { WEBHOOK_ALLOW_HTTP: 'true', WEBHOOK_ALLOW_CIDRS: '127.0.0.0/8,::1/128', WEBHOOK_RETRY_SCHEDULE: '0.05,0.05' } });
  token = await stack.token('acme');
  await seedKms(stack, token);
  await seedLocalKey(stack, token, 'test-key');
  const res = await stack.call('POST', '/api/v1/webhooks/secret', { token });
  expect(res.status).toBe(201);
  secret = res.body.secret;
  stack.watchForLeaks(secret);
});
afterAll(async () => {
  await stack?.close();
  await receiver.close();
});

describe('callbacks end to end', () => {
  it('when an upload with callback_url succeeds, then one signed upload-key.succeeded arrives and the delivery is listed', async () => {
    const res = await stack.call('POST', '/api/v1/cckm/aws/upload-key', { token, body: { ...example, aws_param: { Alias: 'cb-1' }, callback_url: receiver.url('/single') } });
    expect(res.status).toBe(202);
    const got = await deliveriesAt('/single', 1);
    expect(got).toHaveLength(1);
    const event = verified(got[0] as { body: string; headers: Record<string, string> });
    expect(event.type).toBe('upload-key.succeeded');
    expect(event.data).toMatchObject({ id: res.body.id, status: 'succeeded', result: { aws_param: { Alias: ['alias/cb-1'] } } });
    const deliveries = await stack.call('GET', `/api/v1/jobs/${res.body.id}/deliveries`, { token });
    expect(deliveries.body.deliveries).toEqual([expect.objectContaining({ event_type: 'upload-key.succeeded', outcome: 'delivered', status_code: 200 })]);
  });

  it('when an upload fails for good, then upload-key.failed carries its error', async () => {
    const res = await stack.call('POST', '/api/v1/cckm/aws/upload-key', { token, body: { ...example, source_key_identifier: 'nope', callback_url: receiver.url('/failed') } });
    await waitForJob(stack, token, res.body.id);
    const got = await deliveriesAt('/failed', 1);
    expect(got).toHaveLength(1);
    expect(verified(got[0] as { body: string; headers: Record<string, string> })).toMatchObject({ type: 'upload-key.failed', data: { error: { code: 'source_key_not_found' } } });
  });

  it('when a batch with callback_url completes, then batch.completed arrives exactly once with the final counts', async () => {
    const items = [0, 1, 2, 3].map((i) => ({ source_key_identifier: i === 3 ? 'nope' : 'test-key', region: 'ap-south-1', kms: 'kms', aws_param: { Alias: `cb-batch-${i}` } }));
    const res = await stack.call('POST', '/api/v1/cckm/aws/upload-key/batch', { token, body: { items, callback_url: receiver.url('/batch') } });
    expect(res.status).toBe(202);
    const got = await deliveriesAt('/batch', 1, 1000);
    expect(got).toHaveLength(1);
    expect(verified(got[0] as { body: string; headers: Record<string, string> })).toMatchObject({
      type: 'batch.completed',
      data: { id: res.body.id, status: 'completed', total: 4, counts: { succeeded: 3, failed: 1 } },
    });
    const deliveries = await stack.call('GET', `/api/v1/batches/${res.body.id}/deliveries`, { token });
    expect(deliveries.body.deliveries).toHaveLength(1);
  });

  it('when a callback_url is not an acceptable URL, then intake answers 400 with its path', async () => {
    const bad = await stack.call('POST', '/api/v1/cckm/aws/upload-key', { token, body: { ...example, callback_url: 'http://user:pw@localhost/x' } });
    expect(bad.status).toBe(400);
    expect(bad.body.errors[0].path).toBe('callback_url');
    const badItem = await stack.call('POST', '/api/v1/cckm/aws/upload-key/batch', { token, body: { items: [{ ...example, callback_url: 'ftp://x/y' }] } });
    expect(badItem.status).toBe(400);
    expect(badItem.body.errors[0].path).toBe('items[0].callback_url');
  });
});
