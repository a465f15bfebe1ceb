import { generateKeyPairSync, type KeyObject } from 'node:crypto';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { SignJWT, exportJWK, exportSPKI, generateKeyPair, type CryptoKey, type JWTPayload } from 'jose';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { authOptions, verifyToken } from '../shared/auth.js';
import { UnauthorizedError, UnavailableError } from '../shared/errors.js';
import { freePort } from './helpers/redis-server.js';
import { startStack, type TestStack } from './helpers/stack.js';

/**
 * JWT hardening: tokens are HS256 with JWT_SECRET, or RS256/ES256 with a key of the JWK set at
 * JWT_JWKS_URL (served here by a tiny local server); everything else is a 401 problem.
 */
const ISSUER = 'https://issuer.test';
const AUDIENCE = 'keyferry';

let jwks: Server;
let withJwks: TestStack;
let hsOnly: TestStack;
let rsa: { privateKey: CryptoKey; publicKey: CryptoKey };
let ec: { privateKey: CryptoKey; publicKey: CryptoKey };
/** In the set without an `alg`, so that only the API's algorithm list stops PS256 and RS384 with it. */
let rsaNoAlg: { privateKey: KeyObject; publicKey: KeyObject };
let outsider: { privateKey: CryptoKey; publicKey: CryptoKey };

beforeAll(async () => {
  [rsa, ec, outsider] = await Promise.all([generateKeyPair('RS256'), generateKeyPair('ES256'), generateKeyPair('RS256')]);
  rsaNoAlg = generateKeyPairSync('rsa', { modulusLength: 2048 }); // a KeyObject signs with any RSA algorithm
  const keys = [
    { ...(await exportJWK(rsa.publicKey)), kid: 'rsa-1', alg: 'RS256', use: 'sig' },
    { ...(await exportJWK(ec.publicKey)), kid: 'ec-1', alg: 'ES256', use: 'sig' },
    { ...(await exportJWK(rsaNoAlg.publicKey)), kid: 'rsa-no-alg', use: 'sig' },
  ];
  jwks = createServer((req, res) => {
    // Two broken sets for the tests of a JWK set that cannot be had: an error, and a document that is not a set.
    if (req.url === '/broken') return void res.writeHead(500).end();
    if (req.url === '/not-a-set') return void res.writeHead(200, { 'content-type': 'application/json' }).end('{"keys":"none"}');
    res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ keys }));
  });
  await new Promise<void>((resolve) => jwks.listen(0, '127.0.0.1', resolve));
  const jwksUrl = `http://127.0.0.1:${(jwks.address() as AddressInfo).port}/.well-known/jwks.json`;
  const env = { JWT_ISSUER: ISSUER, JWT_AUDIENCE: AUDIENCE };
  [withJwks, hsOnly] = await Promise.all([
    startStack({ name: 'jwt-jwks', worker: false, env: { ...env, JWT_JWKS_URL: jwksUrl } }),
    startStack({ name: 'jwt-hs', worker: false, env }),
  ]);
});
afterAll(async () => {
  await Promise.all([withJwks?.close(), hsOnly?.close()]);
  await new Promise((resolve) => jwks?.close(resolve));
});

const now = () => Math.floor(Date.now() / 1000);

/** A token with good claims unless `claims` overrides them (an undefined claim is left out). */
async function sign(alg: string, key: CryptoKey | KeyObject | Uint8Array, opts: { kid?: string; claims?: JWTPayload } = {}): Promise<string> {
  const claims: JWTPayload = { acc: 'acme', iss: ISSUER, aud: AUDIENCE, iat: now(), exp: now() + 600, ...opts.claims };
  const defined = Object.fromEntries(Object.entries(claims).filter(([, v]) => v !== undefined));
  return new SignJWT(defined).setProtectedHeader({ alg, typ: 'JWT', ...(opts.kid ? { kid: opts.kid } : {}) }).sign(key);
}
const hmac = (stack: TestStack) => new TextEncoder().encode(stack.config.JWT_SECRET);
const b64 = (v: unknown) => Buffer.from(JSON.stringify(v)).toString('base64url');

async function statusWith(stack: TestStack, token: string): Promise<number> {
  const res = await stack.call('GET', '/api/v1/cckm/aws/kms', { token });
  if (res.status === 401) {
    expect(res.headers.get('content-type')).toMatch(/^application\/problem\+json/);
    expect(res.headers.get('www-authenticate')).toBe('Bearer');
    expect(res.body).toMatchObject({ status: 401, code: 'unauthorized' });
  }
  return res.status;
}

describe('accepted tokens', () => {
  it('when JWT_JWKS_URL is set, then RS256 and ES256 tokens signed by keys of the set are accepted, and HS256 with JWT_SECRET still is', async () => {
    expect(await statusWith(withJwks, await sign('RS256', rsa.privateKey, { kid: 'rsa-1' }))).toBe(200);
    expect(await statusWith(withJwks, await sign('ES256', ec.privateKey, { kid: 'ec-1' }))).toBe(200);
    expect(await statusWith(withJwks, await sign('RS256', rsaNoAlg.privateKey, { kid: 'rsa-no-alg' }))).toBe(200);
    expect(await statusWith(withJwks, await sign('HS256', hmac(withJwks)))).toBe(200);
    expect(await statusWith(hsOnly, await sign('HS256', hmac(hsOnly)))).toBe(200);
  });
});

describe('rejected tokens: 401 problem', () => {
  it('when the token is unsecured (alg none), then 401', async () => {
    const payload = b64({ acc: 'acme', iss: ISSUER, aud: AUDIENCE, exp: now() + 600 });
    for (const alg of ['none', 'None', 'NONE']) {
      const unsigned = `${b64({ alg, typ: 'JWT' })}.${payload}.`;
      expect(await statusWith(withJwks, unsigned)).toBe(401);
      expect(await statusWith(hsOnly, unsigned)).toBe(401);
    }
    const strippedHs = (await sign('HS256', hmac(withJwks))).split('.').slice(0, 2).join('.') + '.';
    expect(await statusWith(withJwks, strippedHs)).toBe(401);
  });

  it("when an HS256 token is signed with the set's RSA public key as the HMAC secret, then 401", async () => {
    const pem = new TextEncoder().encode(await exportSPKI(rsa.publicKey));
    const jwk = new TextEncoder().encode(JSON.stringify(await exportJWK(rsa.publicKey)));
    for (const secret of [pem, jwk]) {
      expect(await statusWith(withJwks, await sign('HS256', secret, { kid: 'rsa-1' }))).toBe(401);
      expect(await statusWith(withJwks, await sign('HS256', secret))).toBe(401);
    }
  });

  it('when an RS256 or ES256 token comes and no JWK set is configured, then 401 (only HS256 is accepted)', async () => {
    expect(await statusWith(hsOnly, await sign('RS256', rsa.privateKey, { kid: 'rsa-1' }))).toBe(401);
    expect(await statusWith(hsOnly, await sign('ES256', ec.privateKey, { kid: 'ec-1' }))).toBe(401);
  });

  it('when an asymmetric token uses another algorithm than RS256 or ES256, then 401 even with a key of the set', async () => {
    expect(await statusWith(withJwks, await sign('PS256', rsaNoAlg.privateKey, { kid: 'rsa-no-alg' }))).toBe(401);
    expect(await statusWith(withJwks, await sign('RS384', rsaNoAlg.privateKey, { kid: 'rsa-no-alg' }))).toBe(401);
  });

  it('when the token is signed by a key outside the set, under a kid of the set or an unknown one, then 401', async () => {
    expect(await statusWith(withJwks, await sign('RS256', outsider.privateKey, { kid: 'rsa-1' }))).toBe(401);
    expect(await statusWith(withJwks, await sign('RS256', outsider.privateKey, { kid: 'unknown' }))).toBe(401);
    expect(await statusWith(withJwks, await sign('RS256', outsider.privateKey))).toBe(401);
  });

  it('when the issuer or audience differ from JWT_ISSUER / JWT_AUDIENCE, or are missing, then 401', async () => {
    for (const claims of [{ iss: 'https://evil.test' }, { aud: 'someone-else' }, { iss: undefined }, { aud: undefined }]) {
      expect(await statusWith(withJwks, await sign('RS256', rsa.privateKey, { kid: 'rsa-1', claims }))).toBe(401);
      expect(await statusWith(withJwks, await sign('HS256', hmac(withJwks), { claims }))).toBe(401);
      expect(await statusWith(hsOnly, await sign('HS256', hmac(hsOnly), { claims }))).toBe(401);
    }
  });

  it('when the token has expired, is not yet valid (nbf ahead) or has no exp, then 401', async () => {
    for (const claims of [{ exp: now() - 60 }, { nbf: now() + 600 }, { exp: undefined }]) {
      expect(await statusWith(withJwks, await sign('RS256', rsa.privateKey, { kid: 'rsa-1', claims }))).toBe(401);
      expect(await statusWith(withJwks, await sign('ES256', ec.privateKey, { kid: 'ec-1', claims }))).toBe(401);
      expect(await statusWith(withJwks, await sign('HS256', hmac(withJwks), { claims }))).toBe(401);
    }
  });
});

describe('a JWK set that cannot be had: 503, not 401', () => {
  const options = (path: string) =>
    authOptions({ JWT_SECRET: hsOnly.config.JWT_SECRET, JWT_ISSUER: ISSUER, JWT_AUDIENCE: AUDIENCE, JWT_JWKS_URL: `http://127.0.0.1:${(jwks.address() as AddressInfo).port}${path}` });

  it('when JWT_JWKS_URL answers 500 or with what is not a JWK set, then an RS256 token is not verified for want of the keys (503); HS256 tokens still are', async () => {
    const token = await sign('RS256', rsa.privateKey, { kid: 'rsa-1' });
    for (const path of ['/broken', '/not-a-set']) {
      const opts = options(path);
      await expect(verifyToken(token, opts), path).rejects.toBeInstanceOf(UnavailableError);
      expect((await verifyToken(await sign('HS256', hmac(hsOnly)), opts)).account).toBe('acme');
    }
    // With the set in reach, a key the set does not hold is the token's fault.
    await expect(verifyToken(await sign('RS256', outsider.privateKey, { kid: 'unknown' }), options('/.well-known/jwks.json'))).rejects.toBeInstanceOf(UnauthorizedError);
  });

  it('when JWT_JWKS_URL refuses connections, then the API answers 503 problem with Retry-After and logs why; the admin login too; HS256 tokens are still accepted', async () => {
    const down = await startStack({ name: 'jwt-jwks-down', worker: false, env: { JWT_ISSUER: ISSUER, JWT_AUDIENCE: AUDIENCE, JWT_JWKS_URL: `http://127.0.0.1:${await freePort()}/jwks.json` } });
    try {
      const token = await sign('RS256', rsa.privateKey, { kid: 'rsa-1' });
      const res = await down.call('GET', '/api/v1/cckm/aws/kms', { token });
      expect(res.status).toBe(503);
      expect(res.headers.get('retry-after')).toBe('5');
      expect(res.headers.get('content-type')).toMatch(/^application\/problem\+json/);
      expect(res.body).toMatchObject({ code: 'service_unavailable', detail: expect.stringContaining('JWT_JWKS_URL') });
      expect(down.logs.lines.some((l) => l.includes('JWT_JWKS_URL') && l.includes('fetch failed (ECONNREFUSED)'))).toBe(true);
      const login = await fetch(`${down.api.url}/admin/login`, {
        method: 'POST',
        headers: { 'content-type': 'application/x-www-form-urlencoded', origin: down.api.url },
        body: new URLSearchParams({ token }).toString(),
        redirect: 'manual',
      });
      expect(login.status).toBe(503);
      const page = await fetch(`${down.api.url}/admin/login`, {
        method: 'POST',
        headers: { 'content-type': 'application/x-www-form-urlencoded', origin: down.api.url, accept: 'text/html' },
        body: new URLSearchParams({ token }).toString(),
        redirect: 'manual',
      });
      expect([page.status, page.headers.get('retry-after'), page.headers.get('content-type')]).toEqual([503, '5', expect.stringMatching(/^text\/html/)]);
      expect(await page.text()).toContain('JWT_JWKS_URL');
      expect((await down.call('GET', '/api/v1/cckm/aws/kms', { token: await sign('HS256', hmac(down)) })).status).toBe(200);
    } finally {
      await down.close();
    }
  });
});
