import { createCipheriv, createDecipheriv, createHash, createPublicKey, constants, publicEncrypt, randomBytes } from 'node:crypto';

/** AES-256-GCM's nonce and tag sizes in a sealed value. */
const IV_BYTES = 12;
const TAG_BYTES = 16;

export type WrappingAlgorithm = 'RSAES_OAEP_SHA_256' | 'RSAES_OAEP_SHA_1';

/** Overwrites a buffer's bytes with zeros (key material must not linger in memory). */
export function zeroize(...bufs: (Buffer | Uint8Array | undefined)[]): void {
  for (const b of bufs) b?.fill(0);
}

/**
 * AES-256-GCM envelope for secrets at rest, bound to a context string (AAD) so a sealed value cannot be
 * moved to another record. Format: `kf1.<key id>.<base64(iv | ciphertext | tag)>`; the key id is the first
 * 8 hex characters of SHA-256(master key), so values sealed under an older key can be told apart.
 */
export class SecretBox {
  readonly #keys = new Map<string, Buffer>();
  readonly #current: string;

  constructor(masterKey: Buffer, previousKeys: Buffer[] = []) {
    if (masterKey.length !== 32) throw new Error('master key must be 32 bytes');
    this.#current = SecretBox.keyId(masterKey);
    for (const k of [masterKey, ...previousKeys]) this.#keys.set(SecretBox.keyId(k), Buffer.from(k));
  }

  static keyId(key: Buffer): string {
    return createHash('sha256').update(key).digest('hex').slice(0, 8);
  }

  seal(plaintext: Buffer | string, context: string): string {
    const key = this.#keys.get(this.#current) as Buffer;
    const iv = randomBytes(IV_BYTES);
    const cipher = createCipheriv('aes-256-gcm', key, iv);
    cipher.setAAD(Buffer.from(context));
    const data = typeof plaintext === 'string' ? Buffer.from(plaintext, 'utf8') : plaintext;
    const ct = Buffer.concat([cipher.update(data), cipher.final()]);
    const out = Buffer.concat([iv, ct, cipher.getAuthTag()]);
    if (typeof plaintext === 'string') zeroize(data);
    return `kf1.${this.#current}.${out.toString('base64')}`;
  }

  /**
   * Returns the plaintext in a fresh buffer, the only copy made; the caller zeroizes it after use. The tag is
   * always the full 16 bytes (a shorter one is not accepted as a truncated tag).
   */
  open(sealed: string, context: string): Buffer {
    const [version, kid, body] = sealed.split('.');
    const key = kid === undefined ? undefined : this.#keys.get(kid);
    if (version !== 'kf1' || body === undefined || key === undefined) throw new Error('sealed value has an unknown format or key');
    const raw = Buffer.from(body, 'base64');
    if (raw.length < IV_BYTES + TAG_BYTES) throw new Error('sealed value is too short');
    const decipher = createDecipheriv('aes-256-gcm', key, raw.subarray(0, IV_BYTES), { authTagLength: TAG_BYTES });
    decipher.setAAD(Buffer.from(context));
    decipher.setAuthTag(raw.subarray(raw.length - TAG_BYTES));
    // GCM is a stream mode: update() returns all of the plaintext, final() only checks the tag (and returns
    // nothing). Concatenating the two would leave the plaintext in update()'s buffer too, never zeroized.
    const plain = decipher.update(raw.subarray(IV_BYTES, raw.length - TAG_BYTES));
    try {
      decipher.final();
    } catch (err) {
      zeroize(plain);
      throw err;
    }
    return plain;
  }

  /** The same value sealed under the current master key (unchanged if it already is). */
  reseal(sealed: string, context: string): string {
    if (sealed.startsWith(`kf1.${this.#current}.`)) return sealed;
    const plain = this.open(sealed, context);
    try {
      return this.seal(plain, context);
    } finally {
      zeroize(plain);
    }
  }

  openString(sealed: string, context: string): string {
    const buf = this.open(sealed, context);
    const s = buf.toString('utf8');
    zeroize(buf);
    return s;
  }
}

/** RSA-OAEP wraps key material under AWS's import public key (DER SubjectPublicKeyInfo). */
export function wrapKeyMaterial(material: Buffer, publicKeyDer: Uint8Array, algorithm: WrappingAlgorithm): Buffer {
  const key = createPublicKey({ key: Buffer.from(publicKeyDer), format: 'der', type: 'spki' });
  return publicEncrypt(
    { key, padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: algorithm === 'RSAES_OAEP_SHA_1' ? 'sha1' : 'sha256' },
    material,
  );
}

export function sha256Hex(data: string | Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

/** JSON with object keys sorted, so equal bodies give equal fingerprints. */
export function canonicalJson(value: unknown): string {
  return JSON.stringify(value, (_k, v: unknown) =>
    v && typeof v === 'object' && !Array.isArray(v)
      ? Object.fromEntries(Object.entries(v as Record<string, unknown>).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)))
      : v,
  );
}
