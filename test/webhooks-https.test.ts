/**
 * Webhook deliveries over https, to receivers on loopback with certificates of a CA of the test's own (made with
 * openssl, test/helpers/pykmip.ts makePki), trusted by a worker process of its own through NODE_EXTRA_CA_CERTS. The worker connects to the
 * address it resolved and checked; the URL's host name must still go out as SNI and be the name the receiver's
 * certificate is checked against.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import https from 'node:https';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { TLSSocket } from 'node:tls';
import { Webhook } from 'standardwebhooks';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { runEntry, type Child } from './helpers/child.js';
import { makePki, type CertAndKey } from './helpers/pykmip.js';
import { listenOnLoopback } from './helpers/receiver.js';
import { seedKms, startStack, type TestStack } from './helpers/stack.js';

interface TlsReceiver {
  port: number;
  received: { servername: string | false | null; headers: Record<string, string>; body: string }[];
  close(): Promise<void>;
}

/** An https server on loopback that records each request and the SNI it came with, and answers 200. */
async function tlsReceiver(creds: CertAndKey): Promise<TlsReceiver> {
  const received: TlsReceiver['received'] = [];
  const servers = await listenOnLoopback(() =>
    https.createServer(creds, (req, res) => {
      const chunks: Buffer[] = [];
      req.on('data', (c: Buffer) => chunks.push(c));
      req.on('end', () => {
        received.push({ servername: (req.socket as TLSSocket).servername, headers: req.headers as Record<string, string>, body: Buffer.concat(chunks).toString('utf8') });
        res.writeHead(200).end();
      });
    }),
  );
  return { port: servers.port, received, close: servers.close };
}

let dir: string;
let stack: TestStack;
let worker: Child | undefined;
let token: string;
let secret: string;
/** Its certificate names localhost and comes from the trusted CA. */
let good: TlsReceiver;
/** Its certificate comes from the trusted CA but names another host. */
let misnamed: TlsReceiver;
/** Its certificate names localhost but comes from a CA nobody trusts. */
let stranger: TlsReceiver;

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'keyferry-tls-'));
  const pki = makePki(dir);
  const trusted = join(dir, 'trusted.pem');
  writeFileSync(trusted, pki.ca.cert);
  [good, misnamed, stranger] = await Promise.all([
    tlsReceiver(pki.issue('localhost', { eku: 'serverAuth', altNames: 'DNS:localhost' })),
    tlsReceiver(pki.issue('other.example', { eku: 'serverAuth', altNames: 'DNS:other.example' })),
    tlsReceiver(pki.issue('localhost', { eku: 'serverAuth', altNames: 'DNS:localhost', signer: pki.rogueCa })),
  ]);
  // https only (WEBHOOK_ALLOW_HTTP is off); one retry, 50 ms after the first attempt.
  stack = await startStack({ name: 'webhooks-https', worker: false, env: { WEBHOOK_ALLOW_CIDRS: '127.0.0.0/8,::1/128', WEBHOOK_RETRY_SCHEDULE: '0.05' } });
  token = await stack.token('acme');
  await seedKms(stack, token);
  const res = await stack.call('POST', '/api/v1/webhooks/secret', { token });
  expect(res.status).toBe(201);
  secret = res.body.secret;
  worker = runEntry('worker/main.ts', stack.childEnv({ NODE_EXTRA_CA_CERTS: trusted, WORKER_SHUTDOWN_GRACE_MS: '2000' }));
  await worker.waitForLog('worker started', 30_000);
}, 60_000);

afterAll(async () => {
  if (worker) {
    worker.proc.kill('SIGTERM');
    await worker.exited;
  }
  await stack?.close();
  await Promise.all([good, misnamed, stranger].map((r) => r?.close()));
  if (dir) rmSync(dir, { recursive: true, force: true });
});

/** An upload that fails at once (no such source key), so that its upload-key.failed event goes to `callbackUrl`. */
async function failingUpload(callbackUrl: string): Promise<string> {
  const res = await stack.call('POST', '/api/v1/cckm/aws/upload-key', { token, body: { source_key_identifier: 'nope', region: 'us-east-1', kms: 'kms', callback_url: callbackUrl } });
  expect(res.status).toBe(202);
  return res.body.id as string;
}

interface Delivery {
  outcome: string;
  status_code: number | null;
  error: string | null;
  next_attempt_at: string | null;
}

/** The job's deliveries once the last one is final (delivered, or failed with no attempt left). */
async function finalDeliveries(jobId: string): Promise<Delivery[]> {
  let deliveries: Delivery[] = [];
  await vi.waitFor(
    async () => {
      deliveries = (await stack.call('GET', `/api/v1/jobs/${jobId}/deliveries`, { token })).body.deliveries as Delivery[];
      const last = deliveries.at(-1);
      expect(last && (last.outcome === 'delivered' || last.next_attempt_at === null)).toBe(true);
    },
    { timeout: 20_000, interval: 100 },
  );
  return deliveries;
}

describe('webhook deliveries over https', () => {
  it("when the receiver's certificate names the URL's host and is trusted, then the event arrives over TLS with that host as SNI, signed", async () => {
    const id = await failingUpload(`https://localhost:${good.port}/hook`);
    expect(await finalDeliveries(id)).toEqual([expect.objectContaining({ outcome: 'delivered', status_code: 200, error: null })]);
    expect(good.received).toHaveLength(1);
    const [got] = good.received;
    expect(got?.servername).toBe('localhost');
    expect(new Webhook(secret).verify(got?.body ?? '', got?.headers ?? {})).toMatchObject({ type: 'upload-key.failed', data: { id } });
  });

  it('when the certificate names another host, or comes from an untrusted CA, then nothing is sent to the receiver and each attempt fails with the TLS reason', async () => {
    const misnamedJob = await failingUpload(`https://localhost:${misnamed.port}/hook`);
    const strangerJob = await failingUpload(`https://localhost:${stranger.port}/hook`);
    const [toMisnamed, toStranger] = await Promise.all([finalDeliveries(misnamedJob), finalDeliveries(strangerJob)]);
    expect(toMisnamed.map((d) => [d.outcome, d.error])).toEqual([
      ['failed', 'connection_failed: ERR_TLS_CERT_ALTNAME_INVALID'],
      ['failed', 'connection_failed: ERR_TLS_CERT_ALTNAME_INVALID'],
    ]);
    expect(toStranger).toHaveLength(2);
    for (const d of toStranger) expect([d.outcome, d.error]).toEqual(['failed', 'connection_failed: UNABLE_TO_VERIFY_LEAF_SIGNATURE']);
    expect(misnamed.received).toEqual([]);
    expect(stranger.received).toEqual([]);
  });
});
