import { randomBytes } from 'node:crypto';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { CreateKeyCommand, DescribeKeyCommand, ListResourceTagsCommand } from '@aws-sdk/client-kms';
import { afterAll, describe, expect, it } from 'vitest';
import { SecretBox } from '../shared/crypto.js';
import { kmsSecretContext, type KmsConnection } from '../shared/resources.js';
import { KmsClients } from '../worker/kms-clients.js';
import { KmsEmulator } from './kms-emulator/emulator.js';
import { EMULATOR_ACCESS_KEY, EMULATOR_SECRET_KEY } from './helpers/stack.js';

const box = new SecretBox(randomBytes(32));
const REGION = 'eu-west-1';

/** A KMS connection to `endpoint` with the emulator's credentials. */
function connection(endpoint: string): KmsConnection {
  const id = randomBytes(8).toString('hex');
  const now = new Date().toISOString();
  return {
    id,
    name: `conn-${id}`,
    account: 'acme',
    account_id: '123456789012',
    regions: [REGION],
    credentials: { type: 'access_key', access_key_id: EMULATOR_ACCESS_KEY, secret_sealed: box.seal(EMULATOR_SECRET_KEY, kmsSecretContext('acme', id)) },
    endpoint,
    wrapping_key_spec: null,
    created_at: now,
    updated_at: now,
  };
}

/** An HTTP server that answers every request with `respond` (which may never finish the answer). */
async function server(respond: Parameters<typeof createServer>[1]): Promise<{ url: string; server: Server }> {
  const s = createServer(respond);
  await new Promise<void>((resolve) => s.listen(0, '127.0.0.1', resolve));
  return { url: `http://127.0.0.1:${(s.address() as AddressInfo).port}`, server: s };
}

const cleanups: (() => Promise<void> | void)[] = [];
afterAll(async () => {
  for (const fn of cleanups.reverse()) await fn();
});

/** How a call ends: its error's name, and how long it took (ms). */
async function outcome(call: Promise<unknown>): Promise<{ name: string; ms: number }> {
  const t0 = performance.now();
  const name = await call.then(
    () => 'resolved',
    (err: Error) => err.name,
  );
  return { name, ms: performance.now() - t0 };
}

describe('KMS clients: the deadline of each call, with the middleware resolved once per command', () => {
  const stalls: [string, Parameters<typeof createServer>[1]][] = [
    ['never starts its answer', () => undefined],
    [
      'stops in the middle of its answer',
      (_req, res) => {
        res.writeHead(200, { 'content-type': 'application/x-amz-json-1.1', 'content-length': '200' });
        res.write('{"KeyMetadata":{"KeyId":"');
      },
    ],
  ];
  it.each(stalls)('when KMS %s, then the call fails with TimeoutError once KMS_TIMEOUT_MS passes with no byte from KMS', async (_what, respond) => {
    const stalling = await server(respond);
    const clients = new KmsClients(box, 300, { hosts: ['127.0.0.1:*'], allowHttp: true });
    cleanups.push(() => clients.destroy(), () => {
      stalling.server.closeAllConnections();
      stalling.server.close();
    });
    const { name, ms } = await outcome(clients.get(connection(stalling.url), REGION).send(new DescribeKeyCommand({ KeyId: 'k' })));
    expect(name).toBe('TimeoutError');
    expect(ms).toBeGreaterThanOrEqual(250);
    // Without a deadline that throws, the call would wait for as long as the server holds it (here: forever).
    expect(ms).toBeLessThan(10_000);
  });

  it('when calls of several commands run at once on one client, then each gets the answer to its own input', async () => {
    const emulator = new KmsEmulator({ accounts: { [EMULATOR_ACCESS_KEY]: '123456789012' }, latencyMs: 5 });
    await emulator.start();
    const clients = new KmsClients(box, 5000, { hosts: ['127.0.0.1:*'], allowHttp: true });
    cleanups.push(() => clients.destroy(), () => emulator.close());
    const kms = clients.get(connection(emulator.url), REGION);
    const names = Array.from({ length: 12 }, (_, i) => `key-${i}-${randomBytes(4).toString('hex')}`);
    const created = await Promise.all(
      names.map((n) => kms.send(new CreateKeyCommand({ Origin: 'EXTERNAL', Description: n, Tags: [{ TagKey: 'name', TagValue: n }] }))),
    );
    const ids = created.map((c) => c.KeyMetadata?.KeyId);
    expect(new Set(ids).size).toBe(names.length);
    // Both commands interleaved, each many times at once, on the handlers the client resolved once.
    const [described, tagged] = await Promise.all([
      Promise.all(ids.map((KeyId) => kms.send(new DescribeKeyCommand({ KeyId })))),
      Promise.all(ids.map((KeyId) => kms.send(new ListResourceTagsCommand({ KeyId })))),
    ]);
    expect(described.map((d) => [d.KeyMetadata?.KeyId, d.KeyMetadata?.Description])).toEqual(ids.map((id, i) => [id, names[i]]));
    expect(tagged.map((t) => t.Tags)).toEqual(names.map((n) => [{ TagKey: 'name', TagValue: n }]));
  });
});
