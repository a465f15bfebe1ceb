import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createStores } from '../shared/context.js';
import { setFieldsIfUnchanged } from '../shared/rekey.js';
import { kmsSecretContext, localKeyContext } from '../shared/resources.js';
import { hsmPinContext } from '../shared/source-connections.js';
import { WebhookSecretStore } from '../shared/stores/webhook-secret-store.js';
import { runEntry } from './helpers/child.js';
import { freePort } from './helpers/redis-server.js';
import { EMULATOR_SECRET_KEY, seedKms, seedLocalKey, startStack, testEnv, type TestStack } from './helpers/stack.js';

let stack: TestStack;
let token: string;
const material = randomBytes(32);
let webhookSecret: string;
const HSM_LIBRARY = '/usr/lib/softhsm/libsofthsm2.so';
const hsmPin = `pin-${randomBytes(8).toString('hex')}`;

beforeAll(async () => {
  stack = await startStack({ name: 'rekey', worker: false, env: { HSM_LIBRARIES: HSM_LIBRARY, HSM_TOKENS: 'acme:label=keys' } });
  token = await stack.token('acme');
  await seedKms(stack, token);
  await seedLocalKey(stack, token, 'rekey-key', material.toString('hex'));
  webhookSecret = (await stack.call('POST', '/api/v1/webhooks/secret', { token })).body.secret;
  const hsm = await stack.call('POST', '/api/v1/cckm/hsm', { token, body: { name: 'hsm', library: HSM_LIBRARY, token_label: 'keys', pin: hsmPin } });
  expect(hsm.status).toBe(201);
  stack.watchForLeaks(webhookSecret, hsmPin);
});
afterAll(async () => {
  await stack?.close();
});

describe('master key rotation', () => {
  it('when the master key is rotated and the re-encryption command runs, then every secret opens with the new key alone', async () => {
    const oldKey = stack.config.KEYFERRY_MASTER_KEY;
    const newKey = randomBytes(32);
    const base = { KEYFERRY_PREFIX: stack.config.KEYFERRY_PREFIX, RECORD_RETENTION_DAYS: 30 };
    const newOnly = createStores({ ...base, KEYFERRY_MASTER_KEY: newKey, KEYFERRY_MASTER_KEY_PREVIOUS: [] }, stack.redis);
    const conn = await newOnly.kmsConnections.get('acme', 'kms');
    if (conn.credentials.type !== 'access_key') throw new Error('seeded connection has no secret');
    const sealedBefore = conn.credentials.secret_sealed;
    expect(() => newOnly.box.open(sealedBefore, kmsSecretContext('acme', conn.id))).toThrow();

    // The real command, as an operator runs it: new key current, old key previous.
    const child = runEntry('shared/rekey-main.ts', {
      ...testEnv('rekey'),
      KEYFERRY_PREFIX: stack.config.KEYFERRY_PREFIX,
      KEYFERRY_MASTER_KEY: newKey.toString('hex'),
      KEYFERRY_MASTER_KEY_PREVIOUS: oldKey.toString('hex'),
      JWT_SECRET: stack.config.JWT_SECRET,
    });
    expect(await child.exited).toEqual({ code: 0, signal: null });
    expect(JSON.parse(child.output.find((l) => l.includes('resealed')) ?? '{}')).toEqual({ resealed: { kms_connections: 1, local_keys: 1, hsm_connections: 1, dsm_connections: 0, webhook_secrets: 1 } });

    const after = await newOnly.kmsConnections.get('acme', 'kms');
    if (after.credentials.type !== 'access_key') throw new Error('secret lost');
    expect(newOnly.box.openString(after.credentials.secret_sealed, kmsSecretContext('acme', after.id))).toBe(EMULATOR_SECRET_KEY);
    const key = await newOnly.localKeys.get('acme', 'rekey-key');
    expect(newOnly.box.open(key.material_sealed, localKeyContext('acme', key.id))).toEqual(material);
    expect(await new WebhookSecretStore(stack.redis, newOnly.keys, newOnly.box).signingSecrets('acme')).toEqual([webhookSecret]);
    const hsm = await newOnly.hsmConnections.get('acme', 'hsm');
    expect(newOnly.box.openString(hsm.pin_sealed, hsmPinContext('acme', hsm.id))).toBe(hsmPin);

    // Values sealed under the old key are gone: the old key alone opens nothing any more.
    const oldOnly = createStores({ ...base, KEYFERRY_MASTER_KEY: oldKey, KEYFERRY_MASTER_KEY_PREVIOUS: [] }, stack.redis);
    expect(() => oldOnly.box.open(key.material_sealed, localKeyContext('acme', key.id))).toThrow();

    // Running it again changes nothing.
    const again = runEntry('shared/rekey-main.ts', { ...testEnv('rekey'), KEYFERRY_PREFIX: stack.config.KEYFERRY_PREFIX, KEYFERRY_MASTER_KEY: newKey.toString('hex'), JWT_SECRET: stack.config.JWT_SECRET });
    expect(await again.exited).toEqual({ code: 0, signal: null });
    expect(again.output.join('\n')).toContain('"kms_connections":0,"local_keys":0,"hsm_connections":0,"dsm_connections":0,"webhook_secrets":0');
  });
});

describe('rekey against a Redis Cluster that is away', () => {
  it('when no node of REDIS_CLUSTER_NODES answers, then it exits 1 within seconds, saying so, instead of trying for ever', async () => {
    const nodes = (await Promise.all([freePort(), freePort()])).map((p) => `127.0.0.1:${p}`).join(',');
    const started = Date.now();
    const child = runEntry('shared/rekey-main.ts', { ...testEnv('rekey-away'), REDIS_CLUSTER_NODES: nodes });
    const exited = await Promise.race([child.exited, new Promise<'still running'>((r) => setTimeout(() => r('still running'), 25_000))]);
    if (exited === 'still running') child.proc.kill('SIGKILL');
    expect(exited).toEqual({ code: 1, signal: null });
    expect(Date.now() - started).toBeLessThan(20_000);
    expect(child.output).toContain('rekey: Redis did not answer within 10 s; nothing was re-sealed.');
  }, 30_000);
});

describe('re-sealing while the service runs', () => {
  it('when a field was written between the read and the write back (a webhook-secret rotation), then the write back leaves it as written', async () => {
    const key = `${stack.config.KEYFERRY_PREFIX}:rekey-race`;
    await stack.redis.hset(key, { current: 'sealed-old-1', previous: 'sealed-old-2' });
    // What rekey read: both fields. Meanwhile a rotation writes `current` anew.
    await stack.redis.hset(key, 'current', 'rotated');
    const written = await setFieldsIfUnchanged(stack.redis, key, [
      { field: 'current', read: 'sealed-old-1', next: 'resealed-1' },
      { field: 'previous', read: 'sealed-old-2', next: 'resealed-2' },
    ]);
    expect(written).toBe(1);
    expect(await stack.redis.hgetall(key)).toEqual({ current: 'rotated', previous: 'resealed-2' });
  });
});
