import { randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { ConfigError, loadConfig } from '../shared/config.js';
import { SecretBox, canonicalJson, zeroize } from '../shared/crypto.js';
import { DEFAULT_KMS_QUOTAS } from '../shared/kms-quotas.js';

const good = { KEYFERRY_MASTER_KEY: randomBytes(32).toString('hex'), JWT_SECRET: 'j'.repeat(32) };

describe('configuration', () => {
  it('when only the two secrets are set, then every other setting has its default', () => {
    const c = loadConfig(good);
    expect(c).toMatchObject({ PORT: 8080, REDIS_URL: 'redis://127.0.0.1:6379', KEYFERRY_PREFIX: 'keyferry', JOB_ATTEMPTS: 8, DEFAULT_WRAPPING_KEY_SPEC: 'RSA_4096', ALLOW_HTTP_KMS_ENDPOINT: false });
    expect(c.KEYFERRY_MASTER_KEY).toHaveLength(32);
  });

  it('when values are bad, then the error names each variable', () => {
    const err = (() => {
      try {
        loadConfig({ KEYFERRY_MASTER_KEY: 'short', JWT_SECRET: 'x', PORT: '99999', ALLOW_HTTP_KMS_ENDPOINT: 'maybe' });
      } catch (e) {
        return e;
      }
    })();
    expect(err).toBeInstanceOf(ConfigError);
    for (const v of ['KEYFERRY_MASTER_KEY', 'JWT_SECRET', 'PORT', 'ALLOW_HTTP_KMS_ENDPOINT']) expect((err as Error).message).toContain(v);
  });

  it('when KMS_QUOTAS names some operations, then their quotas replace AWS defaults and the others stay; a bad list names the variable', () => {
    expect(loadConfig(good).KMS_QUOTAS).toMatchObject({ CreateKey: 5, GetParametersForImport: 1, DescribeKey: 2000 });
    expect(loadConfig({ ...good, KMS_QUOTAS: 'CreateKey=10, GetParametersForImport=0.5' }).KMS_QUOTAS).toMatchObject({ CreateKey: 10, GetParametersForImport: 0.5, DescribeKey: 2000 });
    // off: not metered (an infinite rate), for one operation or, alone, for all.
    expect(loadConfig({ ...good, KMS_QUOTAS: 'CreateKey=off,ListKeys=7' }).KMS_QUOTAS).toMatchObject({ CreateKey: Infinity, ListKeys: 7, CreateAlias: 5 });
    expect(Object.values(loadConfig({ ...good, KMS_QUOTAS: 'off' }).KMS_QUOTAS)).toEqual(Object.keys(DEFAULT_KMS_QUOTAS).map(() => Infinity));
    for (const bad of ['Frobnicate=1', 'Frobnicate=off', 'CreateKey=0', 'CreateKey', 'CreateKey=1;ListKeys=2', 'offf', 'off,CreateKey=1']) {
      expect(() => loadConfig({ ...good, KMS_QUOTAS: bad }), bad).toThrow(/KMS_QUOTAS/);
    }
  });

  it('when an allow-list of addresses or HSM_LIBRARIES is malformed, then the start fails naming the variable', () => {
    expect(loadConfig({ ...good, DSM_ALLOW_CIDRS: '10.0.0.0/8,127.0.0.1', HSM_LIBRARIES: '/usr/lib/a.so, /opt/b.so' })).toMatchObject({ HSM_LIBRARIES: ['/usr/lib/a.so', '/opt/b.so'] });
    expect(() => loadConfig({ ...good, DSM_ALLOW_CIDRS: '10.0.0.0/99' })).toThrow(/DSM_ALLOW_CIDRS/);
    expect(() => loadConfig({ ...good, WEBHOOK_ALLOW_CIDRS: 'localhost' })).toThrow(/WEBHOOK_ALLOW_CIDRS/);
    expect(() => loadConfig({ ...good, HSM_LIBRARIES: 'libsofthsm2.so' })).toThrow(/HSM_LIBRARIES/);
  });

  it('when the master key is base64, then it is accepted', () => {
    expect(loadConfig({ ...good, KEYFERRY_MASTER_KEY: randomBytes(32).toString('base64') }).KEYFERRY_MASTER_KEY).toHaveLength(32);
  });
});

describe('SecretBox', () => {
  const box = new SecretBox(randomBytes(32));

  it('when a value is sealed, then it opens only with the same context and shows no plaintext', () => {
    const sealed = box.seal('top secret value', 'ctx-a');
    expect(sealed).toMatch(/^kf1\.[0-9a-f]{8}\./);
    expect(sealed).not.toContain('top secret');
    expect(box.openString(sealed, 'ctx-a')).toBe('top secret value');
    expect(() => box.open(sealed, 'ctx-b')).toThrow();
  });

  it('when the ciphertext is altered or the key differs, then opening fails', () => {
    const sealed = box.seal(Buffer.alloc(32, 7), 'ctx');
    const body = Buffer.from(sealed.split('.')[2] as string, 'base64');
    body[14] = (body[14] ?? 0) ^ 1;
    const tampered = `${sealed.split('.').slice(0, 2).join('.')}.${body.toString('base64')}`;
    expect(() => box.open(tampered, 'ctx')).toThrow();
    expect(() => new SecretBox(randomBytes(32)).open(sealed, 'ctx')).toThrow();
  });

  it('when a sealed value is shorter than its nonce and a full tag, then opening fails without trying a shorter tag', () => {
    const sealed = box.seal(Buffer.alloc(32, 7), 'ctx');
    const [version, kid, body] = sealed.split('.') as [string, string, string];
    const short = Buffer.from(body, 'base64').subarray(0, 12 + 8);
    expect(() => box.open(`${version}.${kid}.${short.toString('base64')}`, 'ctx')).toThrow(/too short/);
  });

  it('when a previous key is kept, then values sealed under it still open', () => {
    const oldKey = randomBytes(32);
    const sealed = new SecretBox(oldKey).seal('v', 'c');
    expect(new SecretBox(randomBytes(32), [oldKey]).openString(sealed, 'c')).toBe('v');
  });

  it('zeroize overwrites buffers', () => {
    const b = Buffer.from('abcdef');
    zeroize(b);
    expect([...b]).toEqual([0, 0, 0, 0, 0, 0]);
  });

  it('canonicalJson ignores key order', () => {
    expect(canonicalJson({ b: 1, a: { d: 2, c: [3, { f: 1, e: 2 }] } })).toBe(canonicalJson({ a: { c: [3, { e: 2, f: 1 }], d: 2 }, b: 1 }));
  });
});
