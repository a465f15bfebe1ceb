import { constants, generateKeyPairSync, privateDecrypt, randomBytes, randomUUID } from 'node:crypto';
import { DecryptCommand, EncryptCommand, KMSClient } from '@aws-sdk/client-kms';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadConfig } from '../shared/config.js';
import { createStores } from '../shared/context.js';
import { createLogger } from '../shared/logger.js';
import { parseUploadKey } from '../shared/schemas/upload-key.js';
import { hsmPinContext, hsmTokenListSchema, type HsmConnection, type HsmTokenRule } from '../shared/source-connections.js';
import { createHsmProvider, type HsmPoolLimits } from '../worker/sources/hsm.js';
import { decryptEmulatorCiphertext } from './kms-emulator/emulator.js';
import { parseCiphertext } from './kms-emulator/ciphertext.js';
import { redisValuesUnder } from './helpers/redis-dump.js';
import { SoftHsm, SOFTHSM_LIBRARY } from './helpers/softhsm.js';
import { EMULATOR_ACCESS_KEY, EMULATOR_SECRET_KEY, seedKms, startStack, waitForJob, type TestStack } from './helpers/stack.js';

/*
 * The hsm-luna source tier against a real PKCS#11 library (SoftHSM2, in this process, like the worker under
 * test), real Redis and the KMS emulator through the real AWS SDK. SoftHSM2 wraps only with SHA-1 OAEP, so
 * the connections the uploads use say RSAES_OAEP_SHA_1.
 */

const MISSING_LIBRARY = '/nonexistent/keyferry/libmissing-pkcs11.so';
const KNOWN_VALUE = randomBytes(32);
const KNOWN_ID = randomBytes(8);
const GENERATED_ID = Buffer.from('c0ffee01', 'hex');
const HEXLABEL_ID = randomBytes(4);

let hsm: SoftHsm;
let stack: TestStack;
let token: string;
let kms: KMSClient;

const registerHsm = (body: Record<string, unknown>, as = token) => stack.call('POST', '/api/v1/cckm/hsm', { token: as, body });
const hsmConnection = (overrides: Record<string, unknown> = {}) => ({
  name: 'softhsm',
  library: SOFTHSM_LIBRARY,
  token_label: hsm.tokenLabel,
  pin: hsm.pin,
  wrapping_algorithm: 'RSAES_OAEP_SHA_1',
  ...overrides,
});

/** Posts an hsm-luna upload; `connection` null sends no source_connection. */
const upload = (identifier: string, connection: string | null = 'softhsm', extra: Record<string, unknown> = {}) =>
  stack.call('POST', '/api/v1/cckm/aws/upload-key', {
    token,
    body: { source_key_tier: 'hsm-luna', ...(connection !== null ? { source_connection: connection } : {}), source_key_identifier: identifier, region: 'us-east-1', kms: 'kms', ...extra },
  });

async function uploadAndWait(identifier: string, connection = 'softhsm') {
  const res = await upload(identifier, connection);
  expect(res.status, JSON.stringify(res.body)).toBe(202);
  return waitForJob(stack, token, res.body.id);
}

/**
 * HSM_TOKENS of the stack: kylo may use the fixture token by label and by slot, plus the absent token and the
 * registry check's; alice only her own partition; every account the shared one.
 */
const stackTokens = () =>
  [`kylo:label=${hsm.tokenLabel}`, `kylo:slot=${hsm.slotId}`, 'kylo:label=no-such-token', 'kylo:label=tok', 'alice:label=alice-partition', '*:label=shared-partition'].join(',');
const tokens = (list: string): HsmTokenRule[] => hsmTokenListSchema.parse(list);

/** What a connection shows: everything but the PIN. */
const VIEW_FIELDS = ['created_at', 'id', 'library', 'name', 'slot', 'token_label', 'updated_at', 'wrapping_algorithm'];

const keysOfJob = (jobId: string) => stack.emulator.keys().filter((k) => k.tags.some((t) => t.TagKey === 'keyferry:job-id' && t.TagValue === jobId));

/** The emulator's GCM additional data: the blob header and the sorted encryption context as JSON (test/kms-emulator/ciphertext.ts). */
const emulatorAad = (header: Buffer, context: Record<string, string>) => Buffer.concat([header, Buffer.from(JSON.stringify(Object.entries(context).sort(([a], [b]) => (a < b ? -1 : 1))))]);

beforeAll(async () => {
  hsm = SoftHsm.start(); // sets SOFTHSM2_CONF before anything in this process loads SoftHSM2
  // (a) known value, sensitive but extractable; (b) generated in the HSM; (c) not extractable; (d) AES-128;
  // (e) two keys with one label; (f) a key whose label is hex and equals (b)'s CKA_ID.
  hsm.importAesKey(KNOWN_VALUE, { label: 'known-aes-256', id: KNOWN_ID });
  hsm.generateAesKey({ label: 'generated-aes-256', id: GENERATED_ID, encryptDecrypt: true });
  hsm.importAesKey(randomBytes(32), { label: 'stuck-aes-256', id: randomBytes(4), extractable: false });
  hsm.generateAesKey({ label: 'short-aes-128', id: randomBytes(4), bytes: 16 });
  hsm.generateAesKey({ label: 'twin', id: randomBytes(4) });
  hsm.generateAesKey({ label: 'twin', id: randomBytes(4) });
  hsm.generateAesKey({ label: GENERATED_ID.toString('hex'), id: HEXLABEL_ID });
  hsm.generateAesKey({ label: 'no-id-aes-256' });

  stack = await startStack({ name: 'hsm', env: { HSM_LIBRARIES: `${SOFTHSM_LIBRARY},${MISSING_LIBRARY}`, HSM_TOKENS: stackTokens() } });
  stack.watchForLeaks(hsm.pin, KNOWN_VALUE);
  token = await stack.token('kylo');
  await seedKms(stack, token);
  for (const body of [
    hsmConnection(),
    hsmConnection({ name: 'softhsm-by-slot', token_label: undefined, slot: hsm.slotId }),
    hsmConnection({ name: 'softhsm-wrong-pin', pin: `wrong-${randomBytes(6).toString('hex')}` }),
    hsmConnection({ name: 'softhsm-sha256', wrapping_algorithm: undefined }),
    hsmConnection({ name: 'missing-library', library: MISSING_LIBRARY }),
    hsmConnection({ name: 'absent-token', token_label: 'no-such-token' }),
  ]) {
    const res = await registerHsm(body);
    if (res.status !== 201) throw new Error(`registering ${body.name} failed: ${res.status} ${JSON.stringify(res.body)}`);
  }
  kms = new KMSClient({ region: 'us-east-1', endpoint: stack.emulator.url, credentials: { accessKeyId: EMULATOR_ACCESS_KEY, secretAccessKey: EMULATOR_SECRET_KEY }, maxAttempts: 1 });
});

afterAll(async () => {
  kms?.destroy();
  try {
    await stack?.close(); // closes the worker's HSM sessions first; fails if the PIN or the known value leaked
    // The worker initialized the library again after hsm.finalize(), so its close() finalized it (and only then).
    expect(() => hsm.module.C_GetSlotList(true)).toThrow('CKR_CRYPTOKI_NOT_INITIALIZED');
  } finally {
    hsm?.close();
  }
});

describe('the SoftHSM2 fixture', () => {
  it('when the worker wraps the known key, it cannot have read it: the HSM refuses CKA_VALUE (CKR_ATTRIBUTE_SENSITIVE)', () => {
    expect(() => hsm.readValue('known-aes-256')).toThrow('CKR_ATTRIBUTE_SENSITIVE');
    expect(() => hsm.readValue('generated-aes-256')).toThrow('CKR_ATTRIBUTE_SENSITIVE');
  });
});

describe('HSM connection registry (POST/GET /api/v1/cckm/hsm)', () => {
  it('when an HSM is registered, then 201 with the connection, no PIN in the answer and none in clear in Redis', async () => {
    const pin = `registry-pin-${randomBytes(8).toString('hex')}`;
    stack.watchForLeaks(pin);
    const res = await registerHsm({ name: 'registry-check', library: SOFTHSM_LIBRARY, token_label: 'tok', pin });
    expect(res.status).toBe(201);
    expect(res.headers.get('location')).toBe(`/api/v1/cckm/hsm/${res.body.id}`);
    expect(res.body).toMatchObject({ name: 'registry-check', library: SOFTHSM_LIBRARY, token_label: 'tok', slot: null, wrapping_algorithm: 'RSAES_OAEP_SHA_256' });
    expect(Object.keys(res.body).sort()).toEqual(VIEW_FIELDS);
    expect(JSON.stringify(res.body)).not.toContain(pin);
    const values = await redisValuesUnder(stack.redis, stack.config.KEYFERRY_PREFIX);
    const record = values.find((v) => v.includes(res.body.id) && v.includes('pin_sealed'));
    expect(record).toBeDefined();
    expect(JSON.parse(record as string).pin_sealed).toMatch(/^kf1\./);
    expect(values.some((v) => v.includes(pin))).toBe(false);
  });

  it('when the library is not one HSM_LIBRARIES allows, then 400 problem+json at library', async () => {
    const res = await registerHsm(hsmConnection({ name: 'evil-lib', library: '/tmp/evil-pkcs11.so' }));
    expect(res.status).toBe(400);
    expect(res.headers.get('content-type')).toMatch(/application\/problem\+json/);
    expect(res.body.errors).toEqual([expect.objectContaining({ path: 'library' })]);
  });

  it('when an account names a token HSM_TOKENS does not give it (another tenant\'s label or slot), then 400 problem+json at token_label or slot naming HSM_TOKENS, listing only its own tokens', async () => {
    const alice = await stack.token('alice');
    const byLabel = await registerHsm(hsmConnection({ name: 'alice-steals-label' }), alice);
    const bySlot = await registerHsm(hsmConnection({ name: 'alice-steals-slot', token_label: undefined, slot: hsm.slotId }), alice);
    const unknown = await registerHsm(hsmConnection({ name: 'alice-probes', token_label: 'some-other-partition' }), alice);
    for (const [res, path] of [[byLabel, 'token_label'], [bySlot, 'slot'], [unknown, 'token_label']] as const) {
      expect(res.status, JSON.stringify(res.body)).toBe(400);
      expect(res.headers.get('content-type')).toMatch(/application\/problem\+json/);
      expect(res.body.errors).toEqual([{ path, message: expect.stringContaining('HSM_TOKENS') }]);
      // Her own tokens, never kylo's.
      expect(res.body.errors[0].message).toContain('label "alice-partition", label "shared-partition"');
      expect(JSON.stringify(res.body)).not.toContain(hsm.tokenLabel);
      expect(JSON.stringify(res.body)).not.toContain(`slot ${hsm.slotId}`);
    }
    // Nothing was recorded.
    expect((await stack.call('GET', '/api/v1/cckm/hsm', { token: alice })).body.total).toBe(0);
    // A bad library and a refused token are reported together.
    const both = await registerHsm(hsmConnection({ name: 'alice-both', library: '/tmp/evil-pkcs11.so' }), alice);
    expect(both.body.errors.map((e: { path: string }) => e.path)).toEqual(['library', 'token_label']);
  });

  it('when an account names its own token, or one HSM_TOKENS gives to * (any account), then 201', async () => {
    const alice = await stack.token('alice');
    expect((await registerHsm(hsmConnection({ name: 'alice-own', token_label: 'alice-partition' }), alice)).status).toBe(201);
    expect((await registerHsm(hsmConnection({ name: 'alice-shared', token_label: 'shared-partition' }), alice)).status).toBe(201);
    const bob = await stack.token('bob'); // no entry of his own: only the * one
    expect((await registerHsm(hsmConnection({ name: 'bob-shared', token_label: 'shared-partition' }), bob)).status).toBe(201);
    const bobsOther = await registerHsm(hsmConnection({ name: 'bob-alice', token_label: 'alice-partition' }), bob);
    expect(bobsOther.status).toBe(400);
    expect(bobsOther.body.errors).toEqual([{ path: 'token_label', message: expect.stringContaining('this account may use: label "shared-partition")') }]);
  });

  it('when both token_label and slot, or neither, are given, then 400 at token_label', async () => {
    const both = await registerHsm(hsmConnection({ name: 'both', slot: 1 }));
    const neither = await registerHsm(hsmConnection({ name: 'neither', token_label: undefined }));
    for (const res of [both, neither]) {
      expect(res.status).toBe(400);
      expect(res.body.errors.map((e: { path: string }) => e.path)).toContain('token_label');
    }
  });

  it('when listed or fetched, then the connections show without PINs; another account sees 404', async () => {
    const list = await stack.call('GET', '/api/v1/cckm/hsm', { token });
    expect(list.status).toBe(200);
    expect(list.body.resources.map((c: { name: string }) => c.name)).toEqual(expect.arrayContaining(['softhsm', 'softhsm-by-slot', 'registry-check']));
    expect(list.body.total).toBe(list.body.resources.length);
    for (const c of list.body.resources) expect(Object.keys(c).sort()).toEqual(VIEW_FIELDS);
    expect(JSON.stringify(list.body)).not.toContain(hsm.pin);
    const one = await stack.call('GET', '/api/v1/cckm/hsm/softhsm-by-slot', { token });
    expect(one.status).toBe(200);
    expect(one.body).toMatchObject({ name: 'softhsm-by-slot', slot: hsm.slotId, token_label: null, wrapping_algorithm: 'RSAES_OAEP_SHA_1' });
    const byId = await stack.call('GET', `/api/v1/cckm/hsm/${one.body.id}`, { token });
    expect(byId.body).toEqual(one.body);
    const other = await stack.token('someone-else');
    expect((await stack.call('GET', `/api/v1/cckm/hsm/${one.body.id}`, { token: other })).status).toBe(404);
    expect((await stack.call('GET', '/api/v1/cckm/hsm/softhsm', { token: other })).status).toBe(404);
  });

  it('when an hsm-luna upload names no connection, then 400 at source_connection; an unknown one, 422 at source_connection', async () => {
    const none = await upload('known-aes-256', null);
    expect(none.status).toBe(400);
    expect(none.body.errors.map((e: { path: string }) => e.path)).toEqual(['source_connection']);
    const unknown = await upload('known-aes-256', 'no-such-hsm');
    expect(unknown.status).toBe(422);
    expect(unknown.body.errors).toEqual([expect.objectContaining({ path: 'source_connection' })]);
  });
});

describe('hsm-luna uploads end to end (API → worker → SoftHSM2 C_WrapKey → KMS emulator)', () => {
  it('when the known key is uploaded by label, then KMS holds exactly its value (Encrypt in KMS, decrypt with the known bytes)', async () => {
    const job = await uploadAndWait('known-aes-256');
    expect(job).toMatchObject({ status: 'succeeded', attempts: 1 });
    expect(job.result).toMatchObject({ key_material_origin: 'hsm-luna', local_key_id: KNOWN_ID.toString('hex'), local_key_name: 'known-aes-256' });
    expect(job.result.aws_param).toMatchObject({ Origin: 'EXTERNAL', KeyState: 'Enabled' });
    const plaintext = randomBytes(40);
    const enc = await kms.send(new EncryptCommand({ KeyId: job.result.aws_param.KeyID, Plaintext: plaintext }));
    const blob = Buffer.from(enc.CiphertextBlob as Uint8Array);
    expect(decryptEmulatorCiphertext(blob, KNOWN_VALUE)).toEqual(plaintext);
    expect(() => decryptEmulatorCiphertext(blob, randomBytes(32))).toThrow();
  });

  it('when the known key is uploaded by its CKA_ID (hex, any case) through a slot connection, then it is the same key and material', async () => {
    const job = await uploadAndWait(KNOWN_ID.toString('hex').toUpperCase(), 'softhsm-by-slot');
    expect(job).toMatchObject({ status: 'succeeded', attempts: 1 });
    expect(job.result).toMatchObject({ key_material_origin: 'hsm-luna', local_key_id: KNOWN_ID.toString('hex'), local_key_name: 'known-aes-256' });
    const plaintext = Buffer.from('material equality by CKA_ID');
    const enc = await kms.send(new EncryptCommand({ KeyId: job.result.aws_param.KeyID, Plaintext: plaintext }));
    expect(decryptEmulatorCiphertext(Buffer.from(enc.CiphertextBlob as Uint8Array), KNOWN_VALUE)).toEqual(plaintext);
  });

  it('when a label is also hex and another key has that CKA_ID, then the label wins', async () => {
    const job = await uploadAndWait(GENERATED_ID.toString('hex'));
    expect(job).toMatchObject({ status: 'succeeded' });
    expect(job.result).toMatchObject({ local_key_id: HEXLABEL_ID.toString('hex'), local_key_name: GENERATED_ID.toString('hex') });
  });

  it('when the key has no CKA_ID, then local_key_id is its label', async () => {
    const job = await uploadAndWait('no-id-aes-256');
    expect(job).toMatchObject({ status: 'succeeded', result: { local_key_id: 'no-id-aes-256', local_key_name: 'no-id-aes-256', key_material_origin: 'hsm-luna' } });
  });

  it('when a key generated in the HSM is uploaded, then KMS and the HSM hold the same key: each decrypts what the other encrypted (AES-GCM)', async () => {
    const job = await uploadAndWait('generated-aes-256');
    expect(job).toMatchObject({ status: 'succeeded', attempts: 1 });
    expect(job.result).toMatchObject({ local_key_id: GENERATED_ID.toString('hex'), local_key_name: 'generated-aes-256' });
    const keyId = job.result.aws_param.KeyID as string;
    const emulated = stack.emulator.keys().find((k) => k.keyId === keyId);
    if (emulated?.material) stack.watchForLeaks(emulated.material);

    // KMS encrypts (the emulator's blob: header | iv | AES-256-GCM body | tag); the HSM decrypts with its key.
    const context = { purpose: 'hsm-proof' };
    const plaintext = randomBytes(48);
    const enc = await kms.send(new EncryptCommand({ KeyId: keyId, Plaintext: plaintext, EncryptionContext: context }));
    const parsed = parseCiphertext(Buffer.from(enc.CiphertextBlob as Uint8Array));
    if (!parsed) throw new Error('not an emulator ciphertext');
    const aad = emulatorAad(parsed.header, context);
    expect(hsm.decryptGcm('generated-aes-256', parsed.iv, aad, Buffer.concat([parsed.body, parsed.tag]))).toEqual(plaintext);
    // The check can fail: another HSM key (the known one cannot decrypt, so use a fresh extractable one) does not verify the tag.
    hsm.generateAesKey({ label: 'other-for-negative-check', encryptDecrypt: true });
    expect(() => hsm.decryptGcm('other-for-negative-check', parsed.iv, aad, Buffer.concat([parsed.body, parsed.tag]))).toThrow(/CKR_/);

    // The HSM encrypts into the emulator's blob format; KMS decrypts with the imported material.
    const header = Buffer.concat([Buffer.from([1, Buffer.byteLength(keyId)]), Buffer.from(keyId, 'ascii')]);
    const iv = randomBytes(12);
    const secret = randomBytes(33);
    const sealed = hsm.encryptGcm('generated-aes-256', iv, emulatorAad(header, context), secret);
    const dec = await kms.send(new DecryptCommand({ CiphertextBlob: Buffer.concat([header, iv, sealed]), EncryptionContext: context }));
    expect(Buffer.from(dec.Plaintext as Uint8Array)).toEqual(secret);
  });

  it('when the key is not extractable, then the job fails at once with source_key_not_extractable and no AWS key is made', async () => {
    const job = await uploadAndWait('stuck-aes-256');
    expect(job).toMatchObject({ status: 'failed', attempts: 1, error: { code: 'source_key_not_extractable', retryable: false } });
    expect(job.error.message).toContain('CKA_EXTRACTABLE false');
    expect(keysOfJob(job.id)).toHaveLength(0);
  });

  it('when the key is AES-128, then source_key_wrong_type', async () => {
    const job = await uploadAndWait('short-aes-128');
    expect(job).toMatchObject({ status: 'failed', attempts: 1, error: { code: 'source_key_wrong_type', retryable: false } });
    expect(job.error.message).toContain('16 bytes');
  });

  it('when two keys share the label, then source_key_ambiguous', async () => {
    const job = await uploadAndWait('twin');
    expect(job).toMatchObject({ status: 'failed', attempts: 1, error: { code: 'source_key_ambiguous', retryable: false } });
    expect(job.error.message).toContain('2 secret keys');
  });

  it('when no key has the label (nor, being hex, the CKA_ID), then source_key_not_found', async () => {
    for (const identifier of ['no-such-label', 'deadbeef']) {
      const job = await uploadAndWait(identifier);
      expect(job).toMatchObject({ status: 'failed', attempts: 1, error: { code: 'source_key_not_found', retryable: false } });
      expect(keysOfJob(job.id)).toHaveLength(0);
    }
  });

  it('when the PIN is wrong, then source_auth_failed, although the right PIN is logged in to the same token in this process', async () => {
    // The 'softhsm' connection logged the token in above; PKCS#11 login is per application and token, so
    // C_Login with a wrong PIN would answer CKR_USER_ALREADY_LOGGED_IN: the worker must log out and try ours.
    const job = await uploadAndWait('known-aes-256', 'softhsm-wrong-pin');
    expect(job).toMatchObject({ status: 'failed', attempts: 1, error: { code: 'source_auth_failed', retryable: false } });
    expect(job.error.message).toContain('CKR_PIN_INCORRECT');
    expect(keysOfJob(job.id)).toHaveLength(0);
    // A refused PIN is not presented again by this worker for a while (failed logins lock HSM users).
    const again = await uploadAndWait('known-aes-256', 'softhsm-wrong-pin');
    expect(again).toMatchObject({ status: 'failed', error: { code: 'source_auth_failed' } });
    expect(again.error.message).toContain('does not present it again');
    // And the right connection logs in again and works.
    expect(await uploadAndWait('known-aes-256')).toMatchObject({ status: 'succeeded', attempts: 1 });
  });

  it('when the token drops every session (C_CloseAllSessions) after an upload, then the next upload reopens, logs in and succeeds in its first attempt', async () => {
    expect(await uploadAndWait('known-aes-256')).toMatchObject({ status: 'succeeded' });
    hsm.closeAllSessions();
    const from = stack.logs.lines.length;
    const job = await uploadAndWait('known-aes-256');
    expect(job).toMatchObject({ status: 'succeeded', attempts: 1 });
    const reopened = stack.logs.lines.slice(from).filter((l) => l.includes('HSM session lost'));
    expect(reopened.length).toBeGreaterThanOrEqual(1);
    expect(reopened[0]).toContain('CKR_SESSION_HANDLE_INVALID');
  });

  it('when the library is finalized under the worker (client restart), then the next upload initializes it again and succeeds in its first attempt', async () => {
    hsm.finalize();
    const from = stack.logs.lines.length;
    const job = await uploadAndWait('known-aes-256');
    expect(job).toMatchObject({ status: 'succeeded', attempts: 1 });
    expect(stack.logs.lines.slice(from).some((l) => l.includes('HSM session lost') && l.includes('CKR_CRYPTOKI_NOT_INITIALIZED'))).toBe(true);
    // The library works again for everyone in the process (the fixture included).
    expect(hsm.findByLabel('known-aes-256')).toHaveLength(1);
  });

  it('when the connection asks SHA-256 OAEP of SoftHSM2 (which wraps only with SHA-1), then source_wrapping_not_supported and the AWS key is scheduled for deletion', async () => {
    const job = await uploadAndWait('known-aes-256', 'softhsm-sha256');
    expect(job).toMatchObject({ status: 'failed', attempts: 1, step: 'wrap', error: { code: 'source_wrapping_not_supported', retryable: false } });
    expect(job.error.message).toContain('RSAES_OAEP_SHA_1');
    expect(job.deletion_scheduled_for).toEqual(expect.any(String));
  });

  it('when a connection was recorded for a token HSM_TOKENS no longer gives the account (list narrowed), then the worker fails the job at once with source_token_not_allowed and no AWS key is made', async () => {
    // The record as the API wrote it while HSM_TOKENS still gave kylo the token 'retired-partition'.
    const stores = createStores(stack.config, stack.redis);
    const id = randomUUID();
    const at = new Date().toISOString();
    const record: HsmConnection = {
      id,
      name: 'retired-grant',
      account: 'kylo',
      created_at: at,
      updated_at: at,
      library: SOFTHSM_LIBRARY,
      token_label: 'retired-partition',
      slot: null,
      pin_sealed: stores.box.seal(hsm.pin, hsmPinContext('kylo', id)),
      wrapping_algorithm: 'RSAES_OAEP_SHA_1',
    };
    await stores.hsmConnections.create(record);
    const job = await uploadAndWait('known-aes-256', 'retired-grant');
    expect(job).toMatchObject({ status: 'failed', attempts: 1, step: 'resolve', error: { code: 'source_token_not_allowed', retryable: false } });
    expect(job.error.message).toContain('HSM_TOKENS');
    expect(keysOfJob(job.id)).toHaveLength(0);
  });

  it('when the PKCS#11 library cannot be loaded on the worker, then source_unavailable is retried until attempts run out', async () => {
    const job = await uploadAndWait('known-aes-256', 'missing-library');
    expect(job).toMatchObject({ status: 'failed', attempts: 5, error: { code: 'source_unavailable', retryable: true } });
    expect(job.error.message).toContain(MISSING_LIBRARY);
    expect(keysOfJob(job.id)).toHaveLength(0);
  });

  it('after all of the above, then no Redis value and no log line holds the PIN or the known key value', async () => {
    const haystacks = [...(await redisValuesUnder(stack.redis, stack.config.KEYFERRY_PREFIX)), ...stack.logs.lines];
    expect(stack.logs.lines.some((l) => l.includes('HSM session'))).toBe(true);
    const needles = [hsm.pin, KNOWN_VALUE.toString('hex'), KNOWN_VALUE.toString('base64'), KNOWN_VALUE.toString('base64url')];
    for (const needle of needles) expect(haystacks.filter((h) => h.includes(needle))).toEqual([]);
  });
});

describe('the hsm-luna provider on its own (worker-side checks)', () => {
  const request = (connection: string) =>
    parseUploadKey({ source_key_tier: 'hsm-luna', source_connection: connection, source_key_identifier: 'known-aes-256', region: 'us-east-1', kms: 'kms' });
  const provider = (libraries: string[], tokenRules: HsmTokenRule[] = tokens(stackTokens()), limits: HsmPoolLimits = {}) =>
    createHsmProvider({ stores: createStores(stack.config, stack.redis), config: { HSM_LIBRARIES: libraries, HSM_TOKENS: tokenRules }, logger: createLogger('silent') }, limits);
  /** The sessions open in this process that were not open before (the helper's own session opened first). */
  const baseline = () => {
    expect(hsm.findByLabel('known-aes-256')).toHaveLength(1);
    const before = hsm.liveSessionHandles();
    return () => hsm.liveSessionHandles().filter((h) => !before.includes(h));
  };
  const pair = generateKeyPairSync('rsa', { modulusLength: 1024 }); // small for speed; the HSM does not care
  const wrappingKey = pair.publicKey.export({ type: 'spki', format: 'der' });

  it('when the worker no longer allows the connection library (HSM_LIBRARIES narrowed), then source_library_not_allowed, permanent', async () => {
    const p = provider([]);
    await expect(p.resolve('kylo', request('softhsm'))).rejects.toMatchObject({ name: 'PipelineError', code: 'source_library_not_allowed', retryable: false });
    await p.close();
  });

  it('when the token is not present, then source_unavailable, retryable', async () => {
    const p = provider([SOFTHSM_LIBRARY]);
    await expect(p.resolve('kylo', request('absent-token'))).rejects.toMatchObject({ code: 'source_unavailable', retryable: true, message: expect.stringContaining('no-such-token') });
    await p.close();
  });

  it('when resolved, then the key carries the connection wrapping algorithm and its wrap output unwraps to the known value; close() closes its session', async () => {
    const p = provider([SOFTHSM_LIBRARY]);
    expect(hsm.findByLabel('known-aes-256')).toHaveLength(1); // (re)opens the helper's own session first
    const before = hsm.liveSessionHandles();
    try {
      const key = await p.resolve('kylo', request('softhsm'));
      expect(key).toMatchObject({ id: KNOWN_ID.toString('hex'), name: 'known-aes-256', origin: 'hsm-luna', wrappingAlgorithm: 'RSAES_OAEP_SHA_1' });
      const wrapped = await key.wrap(wrappingKey, 'RSAES_OAEP_SHA_1');
      expect(wrapped).toHaveLength(128);
      expect(privateDecrypt({ key: pair.privateKey, padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: 'sha1' }, wrapped)).toEqual(KNOWN_VALUE);
      // The public key went into the session as a session object and was destroyed: no object of that label remains.
      expect(hsm.findByLabel('keyferry AWS KMS wrapping key')).toHaveLength(0);
      // One session (the provider's, opened lazily and reused by resolve and wrap) more than before.
      expect(hsm.liveSessionHandles().filter((h) => !before.includes(h))).toHaveLength(1);
    } finally {
      await p.close();
    }
    expect(hsm.liveSessionHandles()).toEqual(before);
    await expect(p.resolve('kylo', request('softhsm'))).rejects.toMatchObject({ code: 'source_unavailable' });
  });
  it('when HSM_TOKENS is narrowed under a worker, then the next resolve or wrap fails with source_token_not_allowed, permanent, and the connection pool is closed', async () => {
    const config = { HSM_LIBRARIES: [SOFTHSM_LIBRARY], HSM_TOKENS: tokens(`kylo:label=${hsm.tokenLabel},kylo:slot=${hsm.slotId}`) };
    const p = createHsmProvider({ stores: createStores(stack.config, stack.redis), config, logger: createLogger('silent') });
    const opened = baseline();
    try {
      const key = await p.resolve('kylo', request('softhsm'));
      expect(opened()).toHaveLength(1);
      config.HSM_TOKENS = tokens(`kylo:slot=${hsm.slotId}`); // the label entry is gone
      // A job between resolve and wrap: the wrap step checks again before any PKCS#11 call.
      await expect(key.wrap(wrappingKey, 'RSAES_OAEP_SHA_1')).rejects.toMatchObject({ name: 'PipelineError', code: 'source_token_not_allowed', retryable: false, message: expect.stringContaining('HSM_TOKENS') });
      await expect(p.resolve('kylo', request('softhsm'))).rejects.toMatchObject({ code: 'source_token_not_allowed', retryable: false });
      expect(opened()).toEqual([]); // the pool and its logged-in session are gone
      // The slot entry still lets the slot connection through.
      expect(await p.resolve('kylo', request('softhsm-by-slot'))).toMatchObject({ name: 'known-aes-256' });
      config.HSM_TOKENS = [];
      await expect(p.resolve('kylo', request('softhsm-by-slot'))).rejects.toMatchObject({ code: 'source_token_not_allowed' });
      // HSM_TOKENS missing from the config object altogether: nothing is allowed (fails closed).
      const bare = createHsmProvider({ stores: createStores(stack.config, stack.redis), config: { HSM_LIBRARIES: [SOFTHSM_LIBRARY] }, logger: createLogger('silent') });
      await expect(bare.resolve('kylo', request('softhsm'))).rejects.toMatchObject({ code: 'source_token_not_allowed' });
      await bare.close();
    } finally {
      await p.close();
    }
  });

  it('when the token is not allowed, then the worker refuses before touching the library: a missing library or an absent token reads the same, source_token_not_allowed', async () => {
    const p = provider([SOFTHSM_LIBRARY, MISSING_LIBRARY], tokens('kylo:label=something-else'));
    try {
      // Allowed, these fail inside PKCS#11 (library not loadable; no such token): here they never get there.
      for (const connection of ['missing-library', 'absent-token', 'softhsm-wrong-pin']) {
        const err = await p.resolve('kylo', request(connection)).catch((e: unknown) => e);
        expect(err, connection).toMatchObject({ code: 'source_token_not_allowed', retryable: false });
        expect((err as Error).message).not.toMatch(/CKR_|not present|could not be loaded/);
      }
    } finally {
      await p.close();
    }
  });

  it('when the HSM refuses the PIN, then the session that tried is closed, not kept idle (and the hold that follows opens none)', async () => {
    const p = provider([SOFTHSM_LIBRARY]);
    const opened = baseline();
    try {
      await expect(p.resolve('kylo', request('softhsm-wrong-pin'))).rejects.toMatchObject({ code: 'source_auth_failed', message: expect.stringContaining('CKR_PIN_INCORRECT') });
      expect(opened()).toEqual([]);
      await expect(p.resolve('kylo', request('softhsm-wrong-pin'))).rejects.toMatchObject({ code: 'source_auth_failed', message: expect.stringContaining('does not present it again') });
      expect(opened()).toEqual([]);
    } finally {
      await p.close();
    }
  });

  it('when a worker has more pools than maxPools, then the least recently used is closed with its sessions, and used again it reopens', async () => {
    const p = provider([SOFTHSM_LIBRARY], undefined, { maxPools: 1 });
    const opened = baseline();
    try {
      await p.resolve('kylo', request('softhsm'));
      const first = opened();
      expect(first).toHaveLength(1);
      await p.resolve('kylo', request('softhsm-by-slot')); // a second pool: the first one goes
      const second = opened();
      expect(second).toHaveLength(1);
      expect(second).not.toEqual(first);
      // A key resolved by an evicted pool still wraps: wrap takes the connection's current pool.
      const key = await p.resolve('kylo', request('softhsm'));
      await p.resolve('kylo', request('softhsm-by-slot'));
      const wrapped = await key.wrap(wrappingKey, 'RSAES_OAEP_SHA_1');
      expect(privateDecrypt({ key: pair.privateKey, padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: 'sha1' }, wrapped)).toEqual(KNOWN_VALUE);
      expect(opened()).toHaveLength(1);
    } finally {
      await p.close();
    }
    expect(opened()).toEqual([]);
  });

  it('when a pool has not been used for idleMs, then the next use of the provider closes it (clock injected)', async () => {
    let t = 1_000_000;
    const p = provider([SOFTHSM_LIBRARY], undefined, { idleMs: 60_000, now: () => t });
    const opened = baseline();
    try {
      await p.resolve('kylo', request('softhsm'));
      const first = opened();
      expect(first).toHaveLength(1);
      t += 59_000;
      await p.resolve('kylo', request('softhsm-by-slot'));
      expect(opened()).toHaveLength(2); // not idle long enough: both pools stay
      t += 30_000; // 'softhsm' unused for 89 s, 'softhsm-by-slot' for 30 s
      await p.resolve('kylo', request('softhsm-by-slot'));
      const left = opened();
      expect(left).toHaveLength(1);
      expect(left).not.toContain(first[0]);
    } finally {
      await p.close();
    }
  });

  it('when a worker takes no more HSM jobs, then its idle pools are closed by a timer all the same', async () => {
    const p = provider([SOFTHSM_LIBRARY], undefined, { idleMs: 100 });
    const opened = baseline();
    try {
      await p.resolve('kylo', request('softhsm'));
      expect(opened()).toHaveLength(1);
      const deadline = Date.now() + 3_000;
      while (opened().length > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 25));
      expect(opened()).toEqual([]);
    } finally {
      await p.close();
    }
  });
});

describe('HSM_TOKENS (configuration)', () => {
  const good = { KEYFERRY_MASTER_KEY: randomBytes(32).toString('hex'), JWT_SECRET: 'j'.repeat(32) };

  it('when unset, then no token is allowed; entries parse to account and label or slot, * included', () => {
    expect(loadConfig(good).HSM_TOKENS).toEqual([]);
    expect(loadConfig({ ...good, HSM_TOKENS: 'acme:label=byok partition, *:slot=0 ,org:team:label=a:b=c,tenant:slot=4294967295' }).HSM_TOKENS).toEqual([
      { account: 'acme', label: 'byok partition', slot: null },
      { account: '*', label: null, slot: 0 },
      { account: 'org:team', label: 'a:b=c', slot: null },
      { account: 'tenant', label: null, slot: 4294967295 },
    ]);
  });

  it('when an entry is malformed, then the start fails naming HSM_TOKENS', () => {
    for (const bad of ['acme', 'acme:label=', ':label=x', 'acme:slot=-1', 'acme:slot=x', 'acme:slot=4294967296', `acme:label=${'x'.repeat(33)}`, 'acme:label=x,', 'acme:token=x', 'acme:label=x,,bob:slot=1']) {
      expect(() => loadConfig({ ...good, HSM_TOKENS: bad }), bad).toThrow(/HSM_TOKENS/);
    }
  });
});
