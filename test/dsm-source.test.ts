import { randomBytes } from 'node:crypto';
import { createServer as createTcpServer, type AddressInfo } from 'node:net';
import * as tls from 'node:tls';
import { EncryptCommand, KMSClient } from '@aws-sdk/client-kms';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ConfigError, loadConfig, type Config } from '../shared/config.js';
import { createStores } from '../shared/context.js';
import { PipelineError } from '../shared/errors.js';
import { createLogger } from '../shared/logger.js';
import type { UploadKeyRequest } from '../shared/schemas/upload-key.js';
import { parseCidrs } from '../shared/ssrf.js';
import { KmipClient, type KmipClientOptions } from '../worker/kmip/client.js';
import { KmipAddressForbiddenError, KmipNetworkError, KmipProtocolError } from '../worker/kmip/errors.js';
import { protocolVersion } from '../worker/kmip/messages.js';
import { Operation, ResultReason, ResultStatus, Tag, type ProtocolVersion } from '../worker/kmip/tags.js';
import { dateTime, decode, encode, enumeration, integer, optional, required, structure, textString, type Ttlv } from '../worker/kmip/ttlv.js';
import { createDsmProvider, type DsmClientLimits } from '../worker/sources/dsm.js';
import { decryptEmulatorCiphertext } from './kms-emulator/emulator.js';
import { activate, createAesKey, registerSecretData, registerSymmetricKey, revokeCompromised, revokeDeactivated, startPyKmip, type PyKmip } from './helpers/pykmip.js';
import { redisValuesUnder } from './helpers/redis-dump.js';
import { EMULATOR_ACCESS_KEY, EMULATOR_SECRET_KEY, seedKms, startStack, testEnv, waitForJob, type TestStack } from './helpers/stack.js';

/** The PipelineError a promise rejects with (failing the test if it resolves or rejects otherwise). */
async function failure(p: Promise<unknown>): Promise<PipelineError> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(PipelineError);
  return err as PipelineError;
}

let pykmip: PyKmip;
let stack: TestStack;
let token: string;
const keys: Record<string, { uid: string; material?: Buffer }> = {};

/** The body of a DSM connection to the test's PyKMIP server, with the owner's client certificate. */
const dsmBody = (name: string, overrides: Record<string, unknown> = {}) => ({
  name,
  host: pykmip.host,
  port: pykmip.port,
  ca_certificate: pykmip.pki.ca.cert,
  client_certificate: pykmip.client.cert,
  client_key: pykmip.client.key,
  ...overrides,
});

async function registerDsm(name: string, overrides: Record<string, unknown> = {}, as = token) {
  const res = await stack.call('POST', '/api/v1/cckm/dsm', { token: as, body: dsmBody(name, overrides) });
  expect(res.status, JSON.stringify(res.body)).toBe(201);
  return res.body as { id: string; name: string };
}

const uploadFrom = (connection: string, identifier: string, extra: Record<string, unknown> = {}) =>
  stack.call('POST', '/api/v1/cckm/aws/upload-key', {
    token,
    body: { source_key_tier: 'dsm', source_connection: connection, source_key_identifier: identifier, region: 'us-east-1', kms: 'kms', ...extra },
  });

async function uploadAndWait(connection: string, identifier: string) {
  const res = await uploadFrom(connection, identifier);
  expect(res.status, JSON.stringify(res.body)).toBe(202);
  return waitForJob(stack, token, res.body.id, 15_000);
}

/** Encrypts under the uploaded AWS key in the emulator and decrypts with the source bytes: equal material, or it throws. */
async function kmsHolds(keyId: string, material: Buffer): Promise<boolean> {
  const kms = new KMSClient({ region: 'us-east-1', endpoint: stack.emulator.url, credentials: { accessKeyId: EMULATOR_ACCESS_KEY, secretAccessKey: EMULATOR_SECRET_KEY }, maxAttempts: 1 });
  try {
    const plaintext = randomBytes(24);
    const enc = await kms.send(new EncryptCommand({ KeyId: keyId, Plaintext: plaintext }));
    return decryptEmulatorCiphertext(Buffer.from(enc.CiphertextBlob as Uint8Array), material).equals(plaintext);
  } catch {
    return false;
  } finally {
    kms.destroy();
  }
}

const logLines = (msg: string) => stack.logs.lines.map((l) => JSON.parse(l) as Record<string, unknown>).filter((l) => l.msg === msg);
const kmipLogs = () => logLines('kmip connected');
/** The worker's warn line about a failed KMIP exchange on DSM connection `id` (the detail a tenant does not see). */
const failureLog = (id: string) => logLines('kmip request failed').filter((l) => l.dsm_connection === id).at(-1);
/** Connects logged for DSM connection `id`. */
const connectsOf = (id: string) => kmipLogs().filter((l) => l.dsm_connection === id).length;
const getsMade = () => (pykmip.log().match(/Processing operation: Get$/gm) ?? []).length;

/** Waits until the job has an error (retrying or failed) and returns it. */
async function jobError(id: string, timeoutMs = 10_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const job = (await stack.call('GET', `/api/v1/jobs/${id}`, { token })).body;
    if (job.error || Date.now() > deadline) return job;
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** An IPv4 or IPv6 address, a socket/DNS errno, or TLS/OpenSSL and timing wording: what a tenant must never read. */
const IP_TEXT = /\b\d{1,3}(\.\d{1,3}){3}\b|\b[0-9a-f]{0,4}(:[0-9a-f]{0,4}){2,}\b/i;
const ERRNO_TEXT = /\bE[A-Z]{3,}\b|ERR_|SSL/;
const SOCKET_WORDS = /alert|refused|reset|timed? ?out|longer than|\bms\b|wrong version|packet length|handshake|unknown ca/i;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
async function until(cond: () => boolean | Promise<boolean>, timeoutMs = 3_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`condition not met within ${timeoutMs} ms`);
    await sleep(10);
  }
}

/** A loopback port nothing listens on. */
async function closedPort(): Promise<number> {
  const srv = createTcpServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const { port } = srv.address() as AddressInfo;
  await new Promise<void>((r) => srv.close(() => r()));
  return port;
}

/** An RSA wrapping key pair like AWS's; `unwrap` opens what wrap() made. */
async function wrappingKey() {
  const { generateKeyPairSync, privateDecrypt, constants } = await import('node:crypto');
  const { publicKey, privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  return {
    spki: publicKey.export({ type: 'spki', format: 'der' }),
    unwrap: (wrapped: Buffer) => privateDecrypt({ key: privateKey, padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: 'sha256' }, wrapped),
  };
}

beforeAll(async () => {
  pykmip = await startPyKmip({ clientCn: 'keyferry-worker' });
  stack = await startStack({
    name: 'dsm',
    // 8 attempts 100-600 ms apart (±50 % jitter): long enough to restart PyKMIP while a job retries.
    // DSM_ALLOWED_PORTS: PyKMIP's and the scripted servers' random ports, and Redis's 6379.
    env: { DSM_ALLOW_CIDRS: '127.0.0.1/32', DSM_ALLOWED_PORTS: '1024-65535', KMIP_TIMEOUT_MS: '2000', JOB_ATTEMPTS: '8', JOB_BACKOFF_MS: '100', JOB_BACKOFF_MAX_MS: '600' },
  });
  token = await stack.token('acme');
  await seedKms(stack, token);
  // Every line of the client key's base64 body, in case it leaked without its PEM armour or JSON-escaped.
  stack.watchForLeaks(...pykmip.client.key.split('\n').filter((l) => l.length >= 40));

  const admin = pykmip.admin;
  const known = async (label: string, name: string | undefined) => {
    const material = randomBytes(32);
    stack.watchForLeaks(material);
    keys[label] = { uid: await registerSymmetricKey(admin, { ...(name ? { name } : {}), material }), material };
  };
  await known('byName', 'payments-key');
  await known('byUid', 'ledger-key');
  await known('noName', undefined);
  await known('twinA', 'twin');
  await known('twinB', 'twin');
  await known('burnt', 'burnt-key');
  await revokeCompromised(admin, keys.burnt?.uid as string);
  keys.aes128 = { uid: await createAesKey(admin, 'aes-128-key', 128) };
  keys.secret = { uid: await registerSecretData(admin, 'a-password', Buffer.from('correct horse battery staple')) };
});

afterAll(async () => {
  await stack?.close();
  await pykmip?.close();
});

describe('DSM (KMIP) connections registry', () => {
  it('when a connection is registered, then 201 + Location, the view has no client key, and Redis holds it only sealed', async () => {
    const res = await stack.call('POST', '/api/v1/cckm/dsm', { token, body: dsmBody('dsm-main') });
    expect(res.status).toBe(201);
    expect(res.headers.get('location')).toBe(`/api/v1/cckm/dsm/${res.body.id}`);
    expect(res.body).toMatchObject({ name: 'dsm-main', host: '127.0.0.1', port: pykmip.port, server_name: null, kmip_version: null, ca_certificate: pykmip.pki.ca.cert });
    expect(Object.keys(res.body)).not.toContain('client_key');
    expect(Object.keys(res.body)).not.toContain('client_key_sealed');
    expect(JSON.stringify(res.body)).not.toContain('PRIVATE KEY');
    const keyLine = pykmip.client.key.split('\n')[1] as string;
    const values = await redisValuesUnder(stack.redis, stack.config.KEYFERRY_PREFIX);
    expect(values.some((v) => v.includes(res.body.id))).toBe(true);
    expect(values.some((v) => v.includes(keyLine) || v.includes('PRIVATE KEY'))).toBe(false);
  });

  it('when the PEMs are not PEMs or do not parse, then 400 lists each field', async () => {
    const notPem = await stack.call('POST', '/api/v1/cckm/dsm', { token, body: dsmBody('bad-1', { ca_certificate: 'hello', client_key: 'nope' }) });
    expect(notPem.status).toBe(400);
    expect(notPem.body.errors.map((e: { path: string }) => e.path).sort()).toEqual(['ca_certificate', 'client_key']);
    const garbled = '-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----';
    const unreadable = await stack.call('POST', '/api/v1/cckm/dsm', { token, body: dsmBody('bad-2', { client_certificate: garbled }) });
    expect(unreadable.status).toBe(400);
    expect(unreadable.body.errors).toEqual([{ path: 'client_certificate', message: expect.stringMatching(/Not a readable X.509 certificate/) }]);
  });

  it('when the client key does not belong to the client certificate, then 400 at client_key', async () => {
    const other = pykmip.pki.issue('someone-else');
    const res = await stack.call('POST', '/api/v1/cckm/dsm', { token, body: dsmBody('bad-3', { client_key: other.key }) });
    expect(res.status).toBe(400);
    expect(res.body.errors).toEqual([{ path: 'client_key', message: 'Does not belong to client_certificate.' }]);
  });

  it('when listed or read, then the caller sees its own connections; another account gets 404 and an empty list', async () => {
    const mine = await registerDsm('dsm-listed');
    const list = await stack.call('GET', '/api/v1/cckm/dsm', { token });
    expect(list.status).toBe(200);
    expect(list.body.resources.map((r: { name: string }) => r.name)).toContain('dsm-listed');
    expect(list.body.resources.every((r: Record<string, unknown>) => !('client_key' in r) && !('client_key_sealed' in r))).toBe(true);
    for (const ref of [mine.id, 'dsm-listed']) {
      const one = await stack.call('GET', `/api/v1/cckm/dsm/${ref}`, { token });
      expect(one.status).toBe(200);
      expect(one.body.id).toBe(mine.id);
    }
    const stranger = await stack.token('someone-else');
    expect((await stack.call('GET', `/api/v1/cckm/dsm/${mine.id}`, { token: stranger })).status).toBe(404);
    expect((await stack.call('GET', '/api/v1/cckm/dsm', { token: stranger })).body).toEqual({ resources: [], total: 0 });
  });

  it('when DSM_ALLOWED_PORTS is unset, then only 5696 is allowed; ports and ranges parse; anything else stops the start naming it', () => {
    const env = testEnv('dsm-ports');
    expect(loadConfig(env).DSM_ALLOWED_PORTS).toEqual([{ from: 5696, to: 5696 }]);
    expect(loadConfig({ ...env, DSM_ALLOWED_PORTS: '5696, 9000-9100,443' }).DSM_ALLOWED_PORTS).toEqual([
      { from: 5696, to: 5696 },
      { from: 9000, to: 9100 },
      { from: 443, to: 443 },
    ]);
    for (const bad of ['', '0', '65536', '9100-9000', 'kmip', '5696,', '1-2-3', '-5', '5696 9000', '0x1650']) {
      expect(() => loadConfig({ ...env, DSM_ALLOWED_PORTS: bad }), bad).toThrow(ConfigError);
      expect(() => loadConfig({ ...env, DSM_ALLOWED_PORTS: bad }), bad).toThrow(/DSM_ALLOWED_PORTS/);
    }
  });

  it('when a connection names a port outside DSM_ALLOWED_PORTS, then 400 at port and nothing is stored', async () => {
    for (const port of [443, 22, 80]) {
      const res = await stack.call('POST', '/api/v1/cckm/dsm', { token, body: dsmBody(`dsm-port-${port}`, { port }) });
      expect(res.status).toBe(400);
      expect(res.body.errors).toEqual([{ path: 'port', message: 'Must be a port this service allows for KMIP servers (DSM_ALLOWED_PORTS): 1024-65535.' }]);
    }
    const list = await stack.call('GET', '/api/v1/cckm/dsm', { token });
    expect(list.body.resources.map((r: { name: string }) => r.name).filter((n: string) => n.startsWith('dsm-port-'))).toEqual([]);
  });

  it('when an upload names an unknown DSM connection, then 422 at source_connection', async () => {
    const res = await uploadFrom('no-such-dsm', 'payments-key');
    expect(res.status).toBe(422);
    expect(res.body.errors).toEqual([{ path: 'source_connection', message: 'No DSM (KMIP) connection named or with id "no-such-dsm".' }]);
  });
});

describe('upload from a KMIP server (PyKMIP 0.10) end to end', () => {
  it('when a key is named by its Name, then KMIP 2.0 is negotiated, the job succeeds at once, and KMS holds exactly its material', async () => {
    await registerDsm('dsm-v20');
    const job = await uploadAndWait('dsm-v20', 'payments-key');
    expect(job).toMatchObject({ status: 'succeeded', attempts: 1, error: null });
    expect(job.result).toMatchObject({ key_material_origin: 'dsm', local_key_id: keys.byName?.uid, local_key_name: 'payments-key' });
    expect(await kmsHolds(job.result.aws_param.KeyID, keys.byName?.material as Buffer)).toBe(true);
    expect(await kmsHolds(job.result.aws_param.KeyID, keys.byUid?.material as Buffer)).toBe(false);
    expect(kmipLogs().at(-1)).toMatchObject({ kmip_version: '2.0', tls_protocol: 'TLSv1.2', host: '127.0.0.1' });
    // PyKMIP logs each request's bytes: the 2.0 GetAttributes named attributes by Attribute Reference (tag 42013B, an Enumeration).
    expect(pykmip.log()).toMatch(/Request encoding: b'[0-9a-f]*42013b0500000004004200570000000/);
  });

  it('when a key is named by its Unique Identifier over a connection capped at KMIP 1.4 with server_name, then 1.4 is used and the key\'s Name is reported', async () => {
    await registerDsm('dsm-v14', { kmip_version: '1.4', server_name: 'localhost' });
    const job = await uploadAndWait('dsm-v14', keys.byUid?.uid as string);
    expect(job).toMatchObject({ status: 'succeeded', attempts: 1 });
    expect(job.result).toMatchObject({ key_material_origin: 'dsm', local_key_id: keys.byUid?.uid, local_key_name: 'ledger-key' });
    expect(await kmsHolds(job.result.aws_param.KeyID, keys.byUid?.material as Buffer)).toBe(true);
    expect(kmipLogs().some((l) => l.kmip_version === '1.4')).toBe(true);
  });

  it('when a key without a Name is named by its Unique Identifier, then it uploads and the UID stands for its name', async () => {
    const job = await uploadAndWait('dsm-v20', keys.noName?.uid as string);
    expect(job).toMatchObject({ status: 'succeeded', attempts: 1 });
    expect(job.result).toMatchObject({ local_key_id: keys.noName?.uid, local_key_name: keys.noName?.uid });
    expect(await kmsHolds(job.result.aws_param.KeyID, keys.noName?.material as Buffer)).toBe(true);
  });

  const failures: [string, () => string, string][] = [
    ['no object has the name or UID', () => 'no-such-key', 'source_key_not_found'],
    ['the object is an AES-128 key', () => 'aes-128-key', 'source_key_wrong_type'],
    ['the object is Secret Data', () => 'a-password', 'source_key_wrong_type'],
    ['two objects carry the name', () => 'twin', 'source_key_ambiguous'],
    ['the key is Compromised', () => 'burnt-key', 'source_key_wrong_state'],
  ];
  for (const [when, identifier, code] of failures) {
    it(`when ${when}, then the job fails at attempt 1 with ${code} before any AWS key is created`, async () => {
      const job = await uploadAndWait('dsm-v20', identifier());
      expect(job).toMatchObject({ status: 'failed', attempts: 1, error: { code, retryable: false }, result: null });
      expect(stack.emulator.keys().filter((k) => k.tags.some((t) => t.TagValue === job.id))).toHaveLength(0);
    });
  }

  it('when the client certificate\'s CN does not own the key, then PyKMIP denies it: source_permission_denied', async () => {
    const stranger = pykmip.pki.issue('another-tenant');
    await registerDsm('dsm-stranger', { client_certificate: stranger.cert, client_key: stranger.key });
    const job = await uploadAndWait('dsm-stranger', keys.byName?.uid as string);
    expect(job).toMatchObject({ status: 'failed', attempts: 1, error: { code: 'source_permission_denied', retryable: false } });
  });

  it('when the client certificate has no clientAuth extended key usage, then PyKMIP refuses to authenticate it: source_permission_denied', async () => {
    const noEku = pykmip.pki.issue('keyferry-worker', { eku: 'none' });
    await registerDsm('dsm-no-eku', { client_certificate: noEku.cert, client_key: noEku.key });
    const job = await uploadAndWait('dsm-no-eku', 'payments-key');
    expect(job).toMatchObject({ status: 'failed', attempts: 1, error: { code: 'source_permission_denied', retryable: false } });
    expect(job.error.message).toMatch(/Authentication Not Successful/);
  });

  const tlsFailures: [string, () => Record<string, unknown>, RegExp][] = [
    ['the client certificate is signed by a CA the server does not trust', () => {
      const rogue = pykmip.pki.issue('keyferry-worker', { signer: pykmip.pki.rogueCa });
      return { client_certificate: rogue.cert, client_key: rogue.key };
    }, /alert "tlsv1 alert unknown ca" \(ERR_SSL_TLSV1_ALERT_UNKNOWN_CA\)/],
    ['the connection trusts another CA than the one that signed the server', () => ({ ca_certificate: pykmip.pki.rogueCa.cert }), /not trusted/],
    ['the server certificate does not name server_name', () => ({ server_name: 'kmip.example.com' }), /ERR_TLS_CERT_ALTNAME_INVALID/],
  ];
  for (const [when, overrides, detail] of tlsFailures) {
    it(`when ${when}, then the job fails at attempt 1 with source_tls_failed, saying only that TLS failed; the worker logs why`, async () => {
      const conn = await registerDsm(`dsm-tls-${randomBytes(3).toString('hex')}`, overrides());
      const job = await uploadAndWait(conn.name, 'payments-key');
      expect(job).toMatchObject({ status: 'failed', attempts: 1, error: { code: 'source_tls_failed', retryable: false } });
      expect(job.error.message).toBe(
        `TLS with the KMIP server of DSM connection "${conn.name}" failed: check ca_certificate, server_name and that the server trusts client_certificate (the worker's log has the detail).`,
      );
      expect(failureLog(conn.id)).toMatchObject({ level: 40, code: 'source_tls_failed', detail: expect.stringMatching(detail) });
    });
  }

  it('when the host is a link-local (cloud metadata) address outside DSM_ALLOW_CIDRS, then the job fails at attempt 1 with source_address_forbidden', async () => {
    const conn = await registerDsm('dsm-metadata', { host: '169.254.169.254' });
    const job = await uploadAndWait('dsm-metadata', 'payments-key');
    expect(job).toMatchObject({ status: 'failed', attempts: 1, error: { code: 'source_address_forbidden', retryable: false } });
    expect(job.error.message).toBe('The address of the KMIP server of DSM connection "dsm-metadata" is not allowed (DSM_ALLOW_CIDRS).');
    expect(failureLog(conn.id)).toMatchObject({ level: 40, address: '169.254.169.254', detail: expect.stringMatching(/169\.254\.169\.254.*DSM_ALLOW_CIDRS/) });
  });

  it('when connections point at a closed port, at Redis (not TLS), at a plain-TCP server and at a link-local host, then job errors name no address, port or socket/TLS error; the worker log does', async () => {
    const sockets = new Set<import('node:net').Socket>();
    const plain = createTcpServer((socket) => {
      sockets.add(socket);
      socket.on('close', () => sockets.delete(socket));
      socket.on('error', () => undefined);
      socket.end('HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n');
    });
    await new Promise<void>((r) => plain.listen(0, '127.0.0.1', r));
    const unreachable = 'could not be reached.';
    const tlsFailed = "failed: check ca_certificate, server_name and that the server trusts client_certificate (the worker's log has the detail).";
    const cases = [
      { name: 'probe-closed', host: '127.0.0.1', port: await closedPort(), codes: ['source_unavailable'], log: /127\.0\.0\.1.*ECONNREFUSED/ },
      // Redis waits for a line end that a TLS ClientHello never sends: the connect times out (or, another Redis, answers non-TLS).
      { name: 'probe-redis', host: '127.0.0.1', port: 6379, codes: ['source_unavailable', 'source_tls_failed'], log: /127\.0\.0\.1.*6379/ },
      { name: 'probe-plain', host: '127.0.0.1', port: (plain.address() as AddressInfo).port, codes: ['source_tls_failed'], log: /ERR_SSL_/ },
      { name: 'probe-metadata', host: '169.254.169.254', port: 5696, codes: ['source_address_forbidden'], log: /169\.254\.169\.254/ },
    ];
    try {
      const jobs = await Promise.all(
        cases.map(async (c) => {
          const conn = await registerDsm(c.name, { host: c.host, port: c.port });
          const res = await uploadFrom(c.name, 'payments-key');
          expect(res.status).toBe(202);
          return { ...c, conn, job: await jobError(res.body.id) };
        }),
      );
      for (const { name, host, port, codes, log, conn, job } of jobs) {
        expect(codes, name).toContain(job.error?.code);
        const message: string = job.error.message;
        expect(message, name).toBe(
          {
            source_unavailable: `The KMIP server of DSM connection "${name}" ${unreachable}`,
            source_tls_failed: `TLS with the KMIP server of DSM connection "${name}" ${tlsFailed}`,
            source_address_forbidden: `The address of the KMIP server of DSM connection "${name}" is not allowed (DSM_ALLOW_CIDRS).`,
          }[job.error.code as string],
        );
        expect(message, name).not.toMatch(IP_TEXT);
        expect(message, name).not.toMatch(ERRNO_TEXT);
        expect(message, name).not.toMatch(SOCKET_WORDS);
        expect(message, name).not.toContain(String(port));
        // The operator's log has it all: host, port and what the socket or TLS said.
        const line = failureLog(conn.id);
        expect(line, name).toMatchObject({ level: 40, account: 'acme', host, port, code: job.error.code });
        expect(JSON.stringify(line), name).toMatch(log);
      }
      expect(failureLog(jobs[0]?.conn.id as string)).toMatchObject({ errno: 'ECONNREFUSED' });
    } finally {
      for (const socket of sockets) socket.destroy();
      await new Promise<void>((r) => plain.close(() => r()));
    }
  });

  it('when the KMIP server is down, then attempts fail with retryable source_unavailable, and after a restart the job succeeds', async () => {
    await pykmip.stop();
    const res = await uploadFrom('dsm-v20', 'payments-key');
    expect(res.status).toBe(202);
    const deadline = Date.now() + 10_000;
    let job = (await stack.call('GET', `/api/v1/jobs/${res.body.id}`, { token })).body;
    while (!(job.status === 'retrying' && job.error?.code === 'source_unavailable') && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 20));
      job = (await stack.call('GET', `/api/v1/jobs/${res.body.id}`, { token })).body;
    }
    expect(job).toMatchObject({ status: 'retrying', error: { code: 'source_unavailable', retryable: true } });
    expect(job.error.message).toBe('The KMIP server of DSM connection "dsm-v20" could not be reached.');
    expect(logLines('kmip request failed').at(-1)).toMatchObject({ level: 40, code: 'source_unavailable', detail: expect.stringMatching(/ECONNREFUSED|closed|reset/) });
    await pykmip.start();
    const done = await waitForJob(stack, token, res.body.id, 15_000);
    expect(done).toMatchObject({ status: 'succeeded', error: null });
    expect(done.attempts).toBeGreaterThan(1);
    expect(await kmsHolds(done.result.aws_param.KeyID, keys.byName?.material as Buffer)).toBe(true);
  });

  it('when the import-parameters checkpoint fails while the KMIP server is slow to answer the wrap, then its failure is handled: the worker lives on and uploads the next key', async () => {
    // The checkpoint goes on its way while the wrap asks the KMIP server; a failure of it that nothing handled
    // until the wrap returned would end the worker process (Node's default for an unhandled rejection).
    const unhandled: unknown[] = [];
    const onUnhandled = (reason: unknown) => unhandled.push(reason);
    process.on('unhandledRejection', onUnhandled);
    const jobKeys = createStores(stack.config, stack.redis).keys;
    const created = stack.emulator.callCount('CreateKey');
    const paramsAsked = stack.emulator.callCount('GetParametersForImport');
    await registerDsm('dsm-paused');
    try {
      const res = await uploadFrom('dsm-paused', 'payments-key');
      expect(res.status).toBe(202);
      const id = res.body.id as string;
      // Once CreateKey arrives, resolve is done with the KMIP server; the wrap asks it again after GetParametersForImport.
      await until(() => stack.emulator.callCount('CreateKey') > created);
      pykmip.pause();
      // CreateAlias and GetParametersForImport answer 300 ms after they arrive; the key checkpoint lands meanwhile.
      stack.emulator.setLatency(300);
      await until(async () => (JSON.parse((await stack.redis.get(jobKeys.job(id))) ?? '{}') as { progress?: { kms_key_id?: string } }).progress?.kms_key_id !== undefined);
      // Then the record goes away, so the import-parameters checkpoint, sent when GetParametersForImport answers, fails.
      await stack.redis.del(jobKeys.job(id));
      await until(() => stack.emulator.callCount('GetParametersForImport') > paramsAsked);
      await sleep(700); // the answer (300 ms), the failed checkpoint, while the wrap waits for the paused server
      stack.emulator.setLatency(0);
      pykmip.resume();
      const next = await uploadAndWait('dsm-paused', 'payments-key');
      expect(next).toMatchObject({ status: 'succeeded', error: null });
      expect(unhandled).toEqual([]);
      // The worker wrote no record for the job whose record went away.
      expect(await stack.redis.exists(jobKeys.job(id))).toBe(0);
    } finally {
      stack.emulator.setLatency(0);
      if (pykmip.running) pykmip.resume();
      process.off('unhandledRejection', onUnhandled);
    }
  });
});

describe('the dsm source provider on its own', () => {
  const request = (connection: string, identifier: string) =>
    ({ source_key_tier: 'dsm', source_connection: connection, source_key_identifier: identifier, region: 'us-east-1', kms: 'kms' }) as unknown as UploadKeyRequest;
  const provider = (
    allow: string,
    o: { masterKey?: Buffer; ports?: Config['DSM_ALLOWED_PORTS'] | 'absent'; limits?: DsmClientLimits } = {},
  ) =>
    createDsmProvider(
      {
        stores: createStores({ ...stack.config, KEYFERRY_MASTER_KEY: o.masterKey ?? stack.config.KEYFERRY_MASTER_KEY }, stack.redis),
        config: {
          DSM_ALLOW_CIDRS: allow,
          KMIP_TIMEOUT_MS: 2_000,
          ...(o.ports === 'absent' ? {} : { DSM_ALLOWED_PORTS: o.ports ?? stack.config.DSM_ALLOWED_PORTS }),
        },
        logger: createLogger('debug', 'dsm-provider-test', stack.logs),
      },
      o.limits,
    );

  it('when DSM_ALLOW_CIDRS holds something that is not a CIDR, then the provider (and so the worker) refuses to start, naming it', () => {
    expect(() => provider('10.0.0.0/8,10.1.0.0/99')).toThrow(/^DSM_ALLOW_CIDRS: "10.1.0.0\/99" is not a CIDR/);
  });

  it('when DSM_ALLOW_CIDRS is empty, then the loopback PyKMIP server is source_address_forbidden', async () => {
    const p = provider('');
    try {
      expect(await failure(p.resolve('acme', request('dsm-v20', 'payments-key')))).toMatchObject({ code: 'source_address_forbidden', retryable: false });
    } finally {
      await p.close();
    }
  });

  it('when nothing listens on the port, then source_unavailable, retryable', async () => {
    const srv = createTcpServer();
    await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
    const closedPort = (srv.address() as AddressInfo).port;
    await new Promise<void>((r) => srv.close(() => r()));
    await registerDsm('dsm-closed-port', { port: closedPort });
    const p = provider('127.0.0.1/32');
    try {
      expect(await failure(p.resolve('acme', request('dsm-closed-port', 'payments-key')))).toMatchObject({ code: 'source_unavailable', retryable: true });
    } finally {
      await p.close();
    }
  });

  it('when the connection does not exist (or is another account\'s), then source_connection_not_found', async () => {
    const p = provider('127.0.0.1/32');
    try {
      expect(await failure(p.resolve('acme', request('nope', 'payments-key')))).toMatchObject({ code: 'source_connection_not_found', retryable: false });
      expect(await failure(p.resolve('someone-else', request('dsm-v20', 'payments-key')))).toMatchObject({ code: 'source_connection_not_found' });
    } finally {
      await p.close();
    }
  });

  it('when the worker\'s master key cannot open the sealed client key, then source_auth_failed without connecting', async () => {
    const p = provider('127.0.0.1/32', { masterKey: randomBytes(32) });
    try {
      const before = kmipLogs().length;
      expect(await failure(p.resolve('acme', request('dsm-v20', 'payments-key')))).toMatchObject({ code: 'source_auth_failed', retryable: false });
      expect(kmipLogs().length).toBe(before);
    } finally {
      await p.close();
    }
  });

  it('when resolve finds a key, then it fetches no material until wrap, and wrap returns RSA-OAEP-SHA-256 of exactly the key', async () => {
    const { generateKeyPairSync, privateDecrypt, constants } = await import('node:crypto');
    const p = provider('127.0.0.1/32');
    try {
      const before = getsMade();
      const key = await p.resolve('acme', request('dsm-v20', 'payments-key'));
      expect(key).toMatchObject({ id: keys.byName?.uid, name: 'payments-key', origin: 'dsm', wrappingAlgorithm: 'RSAES_OAEP_SHA_256' });
      expect(getsMade()).toBe(before);
      const { publicKey, privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
      const wrapped = await key.wrap(publicKey.export({ type: 'spki', format: 'der' }), 'RSAES_OAEP_SHA_256');
      expect(getsMade()).toBe(before + 1);
      expect(privateDecrypt({ key: privateKey, padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: 'sha256' }, wrapped)).toEqual(keys.byName?.material);
    } finally {
      await p.close();
    }
  });
});

describe('the dsm source provider: ports, client pool, state at wrap, server texts', () => {
  const request = (connection: string, identifier: string) =>
    ({ source_key_tier: 'dsm', source_connection: connection, source_key_identifier: identifier, region: 'us-east-1', kms: 'kms' }) as unknown as UploadKeyRequest;
  const provider = (o: { ports?: Config['DSM_ALLOWED_PORTS'] | 'absent'; limits?: DsmClientLimits } = {}) =>
    createDsmProvider(
      {
        stores: createStores(stack.config, stack.redis),
        config: { DSM_ALLOW_CIDRS: '127.0.0.1/32', KMIP_TIMEOUT_MS: 2_000, ...(o.ports === 'absent' ? {} : { DSM_ALLOWED_PORTS: o.ports ?? stack.config.DSM_ALLOWED_PORTS }) },
        logger: createLogger('debug', 'dsm-provider-test', stack.logs),
      },
      o.limits,
    );
  const closes = (id: string) => logLines('kmip client closed').filter((l) => l.dsm_connection === id).map((l) => l.reason);

  it('when the connection\'s port is outside DSM_ALLOWED_PORTS (or the config does not carry it: 5696 only), then source_address_forbidden without connecting', async () => {
    const srv = await scriptedServer((_c, _r, op) => {
      if (op === Operation.DiscoverVersions) return versions(V14);
      return op === Operation.Locate ? located() : failedResponse(op, ResultReason.ItemNotFound, 'no such object');
    });
    const conn = await registerDsm('dsm-port-refused-later', { port: srv.port });
    const cases: (Config['DSM_ALLOWED_PORTS'] | 'absent')[] = [[{ from: 5696, to: 5696 }, { from: 1, to: srv.port - 1 }], 'absent'];
    try {
      for (const ports of cases) {
        const p = provider({ ports });
        try {
          expect(await failure(p.resolve('acme', request(conn.name, 'payments-key')))).toMatchObject({
            code: 'source_address_forbidden',
            retryable: false,
            message: 'The port of the KMIP server of DSM connection "dsm-port-refused-later" is not allowed (DSM_ALLOWED_PORTS).',
          });
        } finally {
          await p.close();
        }
      }
      expect(srv.connections()).toBe(0);
      // The same connection with its port allowed does connect: it was the port that was refused.
      const allowed = provider({ ports: [{ from: srv.port, to: srv.port }] });
      try {
        expect(await failure(allowed.resolve('acme', request(conn.name, 'payments-key')))).toMatchObject({ code: 'source_key_not_found' });
        expect(srv.connections()).toBe(1);
      } finally {
        await allowed.close();
      }
    } finally {
      await srv.close();
    }
  });

  for (const [state, change] of [
    ['Compromised', (uid: string) => revokeCompromised(pykmip.admin, uid)],
    ['Deactivated', (uid: string) => revokeDeactivated(pykmip.admin, uid)],
  ] as const) {
    it(`when the key becomes ${state} between resolve and wrap, then wrap fails with source_key_wrong_state and makes no Get`, async () => {
      const material = randomBytes(32);
      stack.watchForLeaks(material);
      const name = `turns-${state.toLowerCase()}`;
      const uid = await registerSymmetricKey(pykmip.admin, { name, material });
      await activate(pykmip.admin, uid); // an Active key: revoking it for another reason than compromise deactivates it
      const conn = await registerDsm(`dsm-${name}`);
      const { spki, unwrap } = await wrappingKey();
      const p = provider();
      try {
        const key = await p.resolve('acme', request(conn.name, name));
        expect(unwrap(await key.wrap(spki, 'RSAES_OAEP_SHA_256'))).toEqual(material); // Active: uploadable
        await change(uid);
        const before = getsMade();
        expect(await failure(key.wrap(spki, 'RSAES_OAEP_SHA_256'))).toMatchObject({
          code: 'source_key_wrong_state',
          retryable: false,
          message: `The KMIP key "${name}" (Unique Identifier ${uid}) is ${state}; only Pre-Active and Active keys can be uploaded.`,
        });
        expect(getsMade()).toBe(before);
        // A later attempt resolves afresh, and refuses it there.
        expect(await failure(p.resolve('acme', request(conn.name, name)))).toMatchObject({ code: 'source_key_wrong_state' });
      } finally {
        await p.close();
      }
    });
  }

  it('when more DSM connections are used than maxClients, then the least recently used client is closed, and reconnects on its next use', async () => {
    const [a, b, c] = await Promise.all(['lru-a', 'lru-b', 'lru-c'].map((n) => registerDsm(n)));
    const ids = () => [a, b, c].map((x) => connectsOf(x?.id as string));
    const p = provider({ limits: { maxClients: 2 } });
    try {
      for (const n of ['lru-a', 'lru-b', 'lru-c', 'lru-c', 'lru-b']) await p.resolve('acme', request(n, 'payments-key'));
      expect(ids()).toEqual([1, 1, 1]);
      expect(closes(a?.id as string)).toEqual(['lru']); // evicted when lru-c came
      await p.resolve('acme', request('lru-a', 'payments-key'));
      expect(ids()).toEqual([2, 1, 1]); // lru-a reconnected; lru-c, now the least recently used, went
      expect(closes(c?.id as string)).toEqual(['lru']);
      expect(closes(b?.id as string)).toEqual([]);
    } finally {
      await p.close();
    }
  });

  it('when maxClients is 1 and two connections are used at once, then neither client is closed under a running exchange', async () => {
    await Promise.all(['busy-a', 'busy-b'].map((n) => registerDsm(n)));
    const { spki, unwrap } = await wrappingKey();
    const p = provider({ limits: { maxClients: 1 } });
    try {
      const [x, y] = await Promise.all([p.resolve('acme', request('busy-a', 'payments-key')), p.resolve('acme', request('busy-b', 'ledger-key'))]);
      const [wx, wy] = await Promise.all([x.wrap(spki, 'RSAES_OAEP_SHA_256'), y.wrap(spki, 'RSAES_OAEP_SHA_256')]);
      expect(unwrap(wx)).toEqual(keys.byName?.material);
      expect(unwrap(wy)).toEqual(keys.byUid?.material);
    } finally {
      await p.close();
    }
  });

  it('when a client goes idleTimeoutMs without requests, then its connection is closed and the client let go; a later wrap reconnects', async () => {
    const conn = await registerDsm('dsm-idle');
    const { spki, unwrap } = await wrappingKey();
    const p = provider({ limits: { idleTimeoutMs: 100 } });
    try {
      const key = await p.resolve('acme', request('dsm-idle', 'payments-key'));
      expect(connectsOf(conn.id)).toBe(1);
      await until(() => closes(conn.id).includes('idle'));
      expect(unwrap(await key.wrap(spki, 'RSAES_OAEP_SHA_256'))).toEqual(keys.byName?.material);
      expect(connectsOf(conn.id)).toBe(2);
    } finally {
      await p.close();
    }
  });

  it('when a server that answered KMIP fails a request, then its Result Message is quoted cleaned and cut to 200 characters; a non-KMIP answer is not quoted', async () => {
    const text = `line one\r\n\u001b[31mred\u0007 \u202eevil\u202c ${'x'.repeat(1_000)}`;
    const srv = await scriptedServer((_c, req, op) => {
      if (op === Operation.DiscoverVersions) return versions(V14);
      if (req === 2) return failedResponse(op, ResultReason.InvalidField, text);
      return Buffer.from('HTTP/1.1 400 Bad Request\r\n\r\n');
    });
    const conn = await registerDsm('dsm-chatty', { port: srv.port });
    const p = provider();
    try {
      const refused = await failure(p.resolve('acme', request('dsm-chatty', 'some-key')));
      expect(refused).toMatchObject({ code: 'source_kmip_error', retryable: false });
      const prefix = 'The KMIP server of DSM connection "dsm-chatty" refused the request for "some-key": KMIP Locate failed: ';
      expect(refused.message.startsWith(prefix)).toBe(true);
      // eslint-disable-next-line no-control-regex
      expect(refused.message).not.toMatch(/[\u0000-\u001f\u007f-\u009f\u202a-\u202e]/);
      const quoted = refused.message.slice(refused.message.indexOf('line one'));
      expect(quoted.startsWith('line one [31mred evil xxx')).toBe(true);
      expect([...quoted]).toHaveLength(200);
      expect(quoted.endsWith('x…')).toBe(true);

      const garbled = await failure(p.resolve('acme', request('dsm-chatty', 'some-key')));
      expect(garbled).toMatchObject({
        code: 'source_kmip_error',
        message: 'The KMIP server of DSM connection "dsm-chatty" did not answer with valid KMIP (the worker\'s log has the detail).',
      });
      expect(failureLog(conn.id)).toMatchObject({ level: 40, kmip_error: 'KmipProtocolError', detail: expect.stringMatching(/not a Response Message \(starts 485454502f312e31\)/) });
    } finally {
      await p.close();
      await srv.close();
    }
  });
});

// ---- the client's framing and connection handling, against a scripted TLS server -------------------------

type Reply = Buffer | 'close' | 'silent' | { partial: Buffer };

/** A TLS server speaking just enough KMIP: `reply(connectionNo, requestNo, operation)` decides each answer. */
async function scriptedServer(reply: (conn: number, req: number, operation: number, request: Ttlv) => Reply) {
  let connections = 0;
  let closed = 0;
  const server = tls.createServer({ key: pykmip.pki.server.key, cert: pykmip.pki.server.cert, ca: pykmip.pki.ca.cert, requestCert: true, rejectUnauthorized: true, minVersion: 'TLSv1.2' }, (socket) => {
    const connNo = ++connections;
    let requests = 0;
    let buf = Buffer.alloc(0);
    socket.on('error', () => undefined);
    socket.on('close', () => void closed++);
    socket.on('data', (chunk: Buffer) => {
      buf = Buffer.concat([buf, chunk]);
      while (buf.length >= 8 && buf.length >= 8 + buf.readUInt32BE(4)) {
        const frame = buf.subarray(0, 8 + buf.readUInt32BE(4));
        buf = buf.subarray(frame.length);
        const msg = decode(frame);
        const item = required(msg, Tag.BatchItem, 'Structure');
        const out = reply(connNo, ++requests, required(item, Tag.Operation, 'Enumeration').value, optional(item, Tag.RequestPayload, 'Structure') as Ttlv);
        if (out === 'close') socket.destroy();
        else if (Buffer.isBuffer(out)) socket.write(out);
        else if (out !== 'silent') socket.end(out.partial);
      }
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return {
    port: (server.address() as AddressInfo).port,
    connections: () => connections,
    /** Connections that have closed (from either side). */
    closed: () => closed,
    close: () => new Promise<void>((r) => server.close(() => r())),
  };
}

const V14: ProtocolVersion = { major: 1, minor: 4 };
const response = (operation: number, payload: Ttlv[], version = V14) =>
  encode(
    structure(Tag.ResponseMessage, [
      structure(Tag.ResponseHeader, [protocolVersion(version), dateTime(Tag.TimeStamp, new Date()), integer(Tag.BatchCount, 1)]),
      structure(Tag.BatchItem, [enumeration(Tag.Operation, operation), enumeration(Tag.ResultStatus, 0), structure(Tag.ResponsePayload, payload)]),
    ]),
  );
const versions = (...v: ProtocolVersion[]) => response(Operation.DiscoverVersions, v.map(protocolVersion));
const located = (...uids: string[]) => response(Operation.Locate, uids.map((u) => textString(Tag.UniqueIdentifier, u)));
/** A batch item that failed (Operation Failed) with `reason` and a Result Message. */
const failedResponse = (operation: number, reason: number, message: string, version = V14) =>
  encode(
    structure(Tag.ResponseMessage, [
      structure(Tag.ResponseHeader, [protocolVersion(version), dateTime(Tag.TimeStamp, new Date()), integer(Tag.BatchCount, 1)]),
      structure(Tag.BatchItem, [
        enumeration(Tag.Operation, operation),
        enumeration(Tag.ResultStatus, ResultStatus.OperationFailed),
        enumeration(Tag.ResultReason, reason),
        textString(Tag.ResultMessage, message),
      ]),
    ]),
  );

describe('KMIP client framing and connections (scripted TLS server)', () => {
  const client = (port: number, o: Partial<KmipClientOptions> = {}) =>
    new KmipClient({ host: '127.0.0.1', port, ca: pykmip.pki.ca.cert, cert: pykmip.client.cert, key: pykmip.client.key, allowCidrs: parseCidrs('127.0.0.1/32'), timeoutMs: 1_000, ...o });

  it('when a connection goes idleTimeoutMs without requests, then the client closes it (onIdle) and the next request opens a new one; requests keep it open', async () => {
    const srv = await scriptedServer((_c, _r, op) => (op === Operation.DiscoverVersions ? versions(V14) : located('a')));
    const idle: boolean[] = [];
    const c = client(srv.port, { idleTimeoutMs: 300, onIdle: ({ hadConnection }) => idle.push(hadConnection) });
    try {
      const started = Date.now();
      while (Date.now() - started < 600) {
        expect(await c.locateByName('k')).toEqual(['a']);
        await sleep(50); // well within the idle timeout: the connection stays
      }
      expect([srv.connections(), srv.closed(), idle.length]).toEqual([1, 0, 0]);
      await until(() => srv.closed() === 1, 3_000);
      expect(idle).toEqual([true]);
      expect(c.version).toBeUndefined();
      expect(await c.locateByName('k')).toEqual(['a']);
      expect(srv.connections()).toBe(2);
    } finally {
      await c.close();
      await srv.close();
    }
  });

  it('when the server closes a kept-open connection instead of answering, then an idempotent request is sent once more on a new connection; others are not', async () => {
    const srv = await scriptedServer((conn, req, op) => {
      if (op === Operation.DiscoverVersions) return versions(V14);
      if (conn === 1 && req === 3) return 'close'; // the 2nd request after DiscoverVersions on the first connection
      if (conn === 2 && req === 3) return 'close';
      return located(`uid-${conn}-${req}`);
    });
    const c = client(srv.port);
    try {
      expect(await c.locateByName('k')).toEqual(['uid-1-2']);
      expect(await c.locateByName('k')).toEqual(['uid-2-2']); // the first connection dropped it: resent once on a second
      expect(srv.connections()).toBe(2);
      expect(c.version).toEqual(V14);
      // A non-idempotent request that meets a dropped connection fails instead of being sent twice.
      await expect(c.send(Operation.Register, () => [])).rejects.toBeInstanceOf(KmipNetworkError);
      expect(srv.connections()).toBe(2);
    } finally {
      await c.close();
      await srv.close();
    }
  });

  it('when the server breaks off in the middle of an answer, then even an idempotent request is not sent again', async () => {
    const srv = await scriptedServer((_conn, req, op) => {
      if (op === Operation.DiscoverVersions) return versions(V14);
      return req === 2 ? located('first') : { partial: located('second').subarray(0, 20) };
    });
    const c = client(srv.port);
    try {
      expect(await c.locateByName('k')).toEqual(['first']);
      await expect(c.locateByName('k')).rejects.toMatchObject({ failure: 'closed' });
      expect(srv.connections()).toBe(1);
    } finally {
      await c.close();
      await srv.close();
    }
  });

  it('when the answer arrives in one-byte TLS records, then the frame is reassembled', async () => {
    const srv = await scriptedServer((_c, _r, op) => (op === Operation.DiscoverVersions ? versions(V14) : located('a', 'b')));
    const dribble = tls.createServer({ key: pykmip.pki.server.key, cert: pykmip.pki.server.cert, ca: pykmip.pki.ca.cert, requestCert: true }, (socket) => {
      const upstream = tls.connect({ host: '127.0.0.1', port: srv.port, ca: pykmip.pki.ca.cert, cert: pykmip.client.cert, key: pykmip.client.key, servername: 'localhost' });
      socket.on('error', () => undefined);
      upstream.on('error', () => undefined);
      socket.pipe(upstream);
      upstream.on('data', (chunk: Buffer) => {
        upstream.pause();
        let i = 0;
        const next = () => {
          if (i >= chunk.length) return upstream.resume();
          socket.write(chunk.subarray(i, ++i), next);
        };
        next();
      });
    });
    await new Promise<void>((r) => dribble.listen(0, '127.0.0.1', r));
    const c = client((dribble.address() as AddressInfo).port);
    try {
      expect(await c.locateByName('k')).toEqual(['a', 'b']);
    } finally {
      await c.close();
      await new Promise<void>((r) => dribble.close(() => r()));
      await srv.close();
    }
  });

  it('when a response announces more bytes than allowed, answers garbage, or does not answer in time, then the client fails cleanly', async () => {
    const header = Buffer.from('42007b01ffffff00', 'hex');
    const srv = await scriptedServer((conn, _r, op) => {
      if (op === Operation.DiscoverVersions) return versions(V14);
      if (conn === 1) return header;
      if (conn === 2) return Buffer.from('HTTP/1.1 400 Bad Request\r\n\r\n');
      return 'silent';
    });
    const c = client(srv.port, { timeoutMs: 300 });
    try {
      await expect(c.locateByName('k')).rejects.toThrow(KmipProtocolError);
      await expect(c.locateByName('k')).rejects.toThrow(/not a Response Message/);
      const started = Date.now();
      await expect(c.locateByName('k')).rejects.toMatchObject({ failure: 'timeout' });
      expect(Date.now() - started).toBeLessThan(2_000);
    } finally {
      await c.close();
      await srv.close();
    }
  });

  it('when the server supports none of the versions offered, then there is no common version', async () => {
    const srv = await scriptedServer(() => versions({ major: 1, minor: 0 }));
    const c = client(srv.port, { maxVersion: { major: 1, minor: 3 } });
    try {
      await expect(c.locateByName('k')).rejects.toThrow(/no common KMIP version: offered 1.3, 1.2, the server answered 1.0/);
    } finally {
      await c.close();
      await srv.close();
    }
  });

  it('when the address is outside the allowed ranges, then the client refuses before connecting', async () => {
    const srv = await scriptedServer(() => versions(V14));
    const c = client(srv.port, { allowCidrs: parseCidrs('') });
    try {
      await expect(c.locateByName('k')).rejects.toBeInstanceOf(KmipAddressForbiddenError);
      expect(srv.connections()).toBe(0);
    } finally {
      await c.close();
      await srv.close();
    }
  });
});

describe('no secret left behind', () => {
  it('after all of the above, then no Redis value or log line holds key material or the client key, and connections were logged', async () => {
    const values = await redisValuesUnder(stack.redis, stack.config.KEYFERRY_PREFIX);
    const haystacks = [...values, ...stack.logs.lines];
    const needles = [
      ...pykmip.client.key.split('\n').filter((l) => l.length >= 40),
      ...Object.values(keys).flatMap((k) => (k.material ? [k.material.toString('hex'), k.material.toString('base64')] : [])),
    ];
    expect(needles.length).toBeGreaterThan(6);
    for (const needle of needles) expect(haystacks.some((h) => h.includes(needle))).toBe(false);
    expect(kmipLogs().length).toBeGreaterThanOrEqual(2);
  });
});
