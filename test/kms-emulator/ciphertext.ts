import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';

/**
 * Emulator-private ciphertext blob format:
 *   version (1 byte) | key id length (1 byte) | key id (ASCII) | iv (12 bytes) | AES-256-GCM ciphertext | tag (16 bytes)
 * The header (version + key id) and the canonical encryption context are the GCM additional authenticated data.
 */
const VERSION = 1;
const IV_LENGTH = 12;
const TAG_LENGTH = 16;

export type EncryptionContext = Record<string, string>;

interface ParsedCiphertext {
  keyId: string;
  header: Buffer;
  iv: Buffer;
  body: Buffer;
  tag: Buffer;
}

function additionalData(header: Buffer, context: EncryptionContext): Buffer {
  const entries = Object.entries(context).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  return Buffer.concat([header, Buffer.from(JSON.stringify(entries))]);
}

export function encryptWithMaterial(
  keyId: string,
  material: Buffer,
  plaintext: Buffer,
  context: EncryptionContext,
): Buffer {
  const id = Buffer.from(keyId, 'ascii');
  const header = Buffer.concat([Buffer.from([VERSION, id.length]), id]);
  const iv = randomBytes(IV_LENGTH);
  const cipher = createCipheriv('aes-256-gcm', material, iv);
  cipher.setAAD(additionalData(header, context));
  const body = Buffer.concat([cipher.update(plaintext), cipher.final()]);
  return Buffer.concat([header, iv, body, cipher.getAuthTag()]);
}

/** Splits a blob into its parts; undefined when it is not in the emulator's format. */
export function parseCiphertext(blob: Buffer): ParsedCiphertext | undefined {
  const idLength = blob[1];
  if (blob[0] !== VERSION || idLength === undefined) return undefined;
  const headerLength = 2 + idLength;
  if (blob.length < headerLength + IV_LENGTH + TAG_LENGTH) return undefined;
  return {
    keyId: blob.subarray(2, headerLength).toString('ascii'),
    header: blob.subarray(0, headerLength),
    iv: blob.subarray(headerLength, headerLength + IV_LENGTH),
    body: blob.subarray(headerLength + IV_LENGTH, blob.length - TAG_LENGTH),
    tag: blob.subarray(blob.length - TAG_LENGTH),
  };
}

export function decryptParsed(parsed: ParsedCiphertext, material: Buffer, context: EncryptionContext): Buffer {
  const decipher = createDecipheriv('aes-256-gcm', material, parsed.iv);
  decipher.setAAD(additionalData(parsed.header, context));
  decipher.setAuthTag(parsed.tag);
  return Buffer.concat([decipher.update(parsed.body), decipher.final()]);
}

/**
 * Decrypts a CiphertextBlob returned by the emulator's Encrypt with the given key material,
 * so a test can prove which material a key holds. Throws when the blob or material does not match.
 */
export function decryptEmulatorCiphertext(blob: Buffer, material: Buffer, context: EncryptionContext = {}): Buffer {
  const parsed = parseCiphertext(blob);
  if (!parsed) throw new Error('Not an emulator ciphertext blob');
  return decryptParsed(parsed, material, context);
}
