import {
  constants,
  createHmac,
  generateKeyPair,
  privateDecrypt,
  randomBytes,
  timingSafeEqual,
  type KeyObject,
} from 'node:crypto';
import { KmsError, validationError } from './errors.js';

const WRAPPING_KEY_BITS: Record<string, number> = { RSA_2048: 2048, RSA_3072: 3072, RSA_4096: 4096 };
const OAEP_HASH: Record<string, string> = { RSAES_OAEP_SHA_1: 'sha1', RSAES_OAEP_SHA_256: 'sha256' };
const POOL_SIZE = 2;
const MAC_LENGTH = 32;

interface WrappingKeyPair {
  publicKey: KeyObject;
  privateKey: KeyObject;
}

interface ImportTokenClaims {
  keyArn: string;
  spec: string;
  slot: number;
  algorithm: string;
  expiresAt: number;
}

export interface ImportParameters {
  importToken: Buffer;
  publicKey: Buffer;
  validTo: Date;
}

/**
 * RSA wrapping key pairs, POOL_SIZE per key spec, generated lazily and reused.
 * Shared by every emulator in the process because RSA generation is slow (seconds for 4096 bits).
 */
const pools = new Map<string, Promise<WrappingKeyPair>[]>();

function wrappingKeyPair(spec: string, slot: number, modulusLength: number): Promise<WrappingKeyPair> {
  let pool = pools.get(spec);
  if (!pool) {
    pool = [];
    pools.set(spec, pool);
  }
  return (pool[slot] ??= new Promise((resolve, reject) => {
    generateKeyPair('rsa', { modulusLength }, (err, publicKey, privateKey) =>
      err ? reject(err) : resolve({ publicKey, privateKey }),
    );
  }));
}

/**
 * Issues import tokens and unwraps key material with them. A token is its JSON claims followed by
 * an HMAC-SHA256 under a per-emulator secret, so it cannot be forged and binds the key, the wrapping
 * key pair, the wrapping algorithm and the expiry.
 */
export class ImportTokens {
  private readonly secret = randomBytes(32);
  private readonly nextSlot = new Map<string, number>();

  constructor(private readonly ttlMs: number) {}

  async issue(keyArn: string, algorithm: string, spec: string, now: number): Promise<ImportParameters> {
    const bits = WRAPPING_KEY_BITS[spec];
    if (!(algorithm in OAEP_HASH)) {
      throw validationError(`WrappingAlgorithm must be one of ${Object.keys(OAEP_HASH).join(', ')}`);
    }
    if (bits === undefined) {
      throw validationError(`WrappingKeySpec must be one of ${Object.keys(WRAPPING_KEY_BITS).join(', ')}`);
    }
    const slot = this.nextSlot.get(spec) ?? 0;
    this.nextSlot.set(spec, (slot + 1) % POOL_SIZE);
    const { publicKey } = await wrappingKeyPair(spec, slot, bits);
    const claims: ImportTokenClaims = { keyArn, spec, slot, algorithm, expiresAt: now + this.ttlMs };
    const payload = Buffer.from(JSON.stringify(claims));
    return {
      importToken: Buffer.concat([payload, this.mac(payload)]),
      publicKey: publicKey.export({ type: 'spki', format: 'der' }),
      validTo: new Date(claims.expiresAt),
    };
  }

  /** Unwraps EncryptedKeyMaterial with the key pair and algorithm bound to the token, as ImportKeyMaterial does. */
  async unwrap(importToken: Buffer, keyArn: string, encryptedMaterial: Buffer, now: number): Promise<Buffer> {
    const claims = this.verify(importToken);
    const bits = claims && WRAPPING_KEY_BITS[claims.spec];
    if (!claims || bits === undefined || claims.keyArn !== keyArn) {
      throw new KmsError('InvalidImportTokenException', 'The import token is invalid or was issued for another KMS key.');
    }
    if (now > claims.expiresAt) {
      throw new KmsError('ExpiredImportTokenException', 'The import token has expired.');
    }
    const { privateKey } = await wrappingKeyPair(claims.spec, claims.slot, bits);
    try {
      return privateDecrypt(
        { key: privateKey, padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: OAEP_HASH[claims.algorithm] },
        encryptedMaterial,
      );
    } catch {
      throw new KmsError(
        'InvalidCiphertextException',
        'The key material could not be unwrapped with the import parameters.',
      );
    }
  }

  private mac(payload: Buffer): Buffer {
    return createHmac('sha256', this.secret).update(payload).digest();
  }

  private verify(token: Buffer): ImportTokenClaims | undefined {
    if (token.length <= MAC_LENGTH) return undefined;
    const payload = token.subarray(0, token.length - MAC_LENGTH);
    if (!timingSafeEqual(this.mac(payload), token.subarray(token.length - MAC_LENGTH))) return undefined;
    return JSON.parse(payload.toString()) as ImportTokenClaims;
  }
}
