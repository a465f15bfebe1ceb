import { ItemType, type ItemTypeName } from './tags.js';

/*
 * KMIP's Tag-Type-Length-Value encoding (KMIP 1.4 §9.1, KMIP 2.0 §9.1): a 3-byte tag, a 1-byte type, a 4-byte
 * big-endian length, then the value padded with zero bytes to a multiple of 8. Structures hold a sequence of
 * items whose padded sizes add up to the structure's length.
 *
 * The decoder trusts nothing it reads: every length is checked against what the type allows and against the
 * bytes that are actually there, padding must be zero, text must be valid UTF-8, booleans 0 or 1, and the
 * nesting depth and total size are bounded. Byte String values are views of the decoded buffer (no copy), so
 * zeroizing that buffer zeroizes them too: the client relies on this to wipe key material.
 */

export type Ttlv =
  | { tag: number; type: 'Structure'; value: Ttlv[] }
  | { tag: number; type: 'Integer'; value: number }
  | { tag: number; type: 'LongInteger'; value: bigint }
  | { tag: number; type: 'BigInteger'; value: bigint }
  | { tag: number; type: 'Enumeration'; value: number }
  | { tag: number; type: 'Boolean'; value: boolean }
  | { tag: number; type: 'TextString'; value: string }
  | { tag: number; type: 'ByteString'; value: Buffer }
  /** Seconds since the Unix epoch (signed 64-bit). */
  | { tag: number; type: 'DateTime'; value: bigint }
  /** Seconds (unsigned 32-bit). */
  | { tag: number; type: 'Interval'; value: number }
  /** KMIP 2.0: microseconds since the Unix epoch (signed 64-bit). */
  | { tag: number; type: 'DateTimeExtended'; value: bigint };

export type TtlvOf<T extends ItemTypeName> = Extract<Ttlv, { type: T }>;

/** A malformed TTLV encoding, or a value that cannot be encoded. */
export class TtlvError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'TtlvError';
  }
}

// ---- builders ---------------------------------------------------------------------------------------------

export const structure = (tag: number, value: (Ttlv | undefined)[]): Ttlv => ({ tag, type: 'Structure', value: value.filter((v): v is Ttlv => v !== undefined) });
export const integer = (tag: number, value: number): Ttlv => ({ tag, type: 'Integer', value });
export const longInteger = (tag: number, value: bigint): Ttlv => ({ tag, type: 'LongInteger', value });
export const bigInteger = (tag: number, value: bigint): Ttlv => ({ tag, type: 'BigInteger', value });
export const enumeration = (tag: number, value: number): Ttlv => ({ tag, type: 'Enumeration', value });
export const boolean = (tag: number, value: boolean): Ttlv => ({ tag, type: 'Boolean', value });
export const textString = (tag: number, value: string): Ttlv => ({ tag, type: 'TextString', value });
export const byteString = (tag: number, value: Buffer): Ttlv => ({ tag, type: 'ByteString', value });
export const dateTime = (tag: number, value: Date | bigint): Ttlv => ({
  tag,
  type: 'DateTime',
  value: typeof value === 'bigint' ? value : BigInt(Math.floor(value.getTime() / 1000)),
});
export const interval = (tag: number, seconds: number): Ttlv => ({ tag, type: 'Interval', value: seconds });
export const dateTimeExtended = (tag: number, micros: bigint): Ttlv => ({ tag, type: 'DateTimeExtended', value: micros });

// ---- encoding ---------------------------------------------------------------------------------------------

/** Arithmetic, not bitwise: lengths up to 2^32 - 1 do not fit in the int32 that bitwise operators use. */
const pad8 = (n: number) => Math.ceil(n / 8) * 8;
const INT32_MIN = -0x8000_0000;
const INT32_MAX = 0x7fff_ffff;
const INT64_MIN = -(1n << 63n);
const INT64_MAX = (1n << 63n) - 1n;

/** Two's complement bytes of a Big Integer: the fewest that hold it with its sign, rounded up to a multiple of 8. */
function bigIntegerBytes(value: bigint): number {
  const magnitude = value < 0n ? -value - 1n : value; // -2^(n-1) fits in n bits like 2^(n-1)-1
  const bits = magnitude.toString(2).length + 1; // + the sign bit ("0".length is 1: zero needs one byte)
  return Math.max(8, pad8(Math.ceil(bits / 8)));
}

/** Length of the value field (before padding). */
function valueLength(item: Ttlv): number {
  switch (item.type) {
    case 'Structure':
      return item.value.reduce((n, child) => n + encodedLength(child), 0);
    case 'Integer':
    case 'Enumeration':
    case 'Interval':
      return 4;
    case 'LongInteger':
    case 'Boolean':
    case 'DateTime':
    case 'DateTimeExtended':
      return 8;
    case 'BigInteger':
      return bigIntegerBytes(item.value);
    case 'TextString':
      return Buffer.byteLength(item.value, 'utf8');
    case 'ByteString':
      return item.value.length;
  }
}

/** Bytes the item takes on the wire: 8 header bytes + the value padded to 8. */
export function encodedLength(item: Ttlv): number {
  return 8 + pad8(valueLength(item));
}

function checkTag(tag: number): void {
  if (!Number.isInteger(tag) || tag < 0 || tag > 0xff_ffff) throw new TtlvError(`tag ${tag} does not fit in 3 bytes`);
}

function writeItem(item: Ttlv, out: Buffer, offset: number): number {
  checkTag(item.tag);
  const length = valueLength(item);
  if (length > 0xffff_ffff) throw new TtlvError('item too long');
  out.writeUIntBE(item.tag, offset, 3);
  out.writeUInt8(ItemType[item.type], offset + 3);
  out.writeUInt32BE(length, offset + 4);
  let at = offset + 8;
  switch (item.type) {
    case 'Structure':
      for (const child of item.value) at = writeItem(child, out, at);
      break;
    case 'Integer':
      if (!Number.isInteger(item.value) || item.value < INT32_MIN || item.value > INT32_MAX) throw new TtlvError(`Integer ${item.value} is not a signed 32-bit integer`);
      out.writeInt32BE(item.value, at);
      break;
    case 'Enumeration':
    case 'Interval':
      if (!Number.isInteger(item.value) || item.value < 0 || item.value > 0xffff_ffff) throw new TtlvError(`${item.type} ${item.value} is not an unsigned 32-bit integer`);
      out.writeUInt32BE(item.value, at);
      break;
    case 'LongInteger':
    case 'DateTime':
    case 'DateTimeExtended':
      if (item.value < INT64_MIN || item.value > INT64_MAX) throw new TtlvError(`${item.type} ${item.value} is not a signed 64-bit integer`);
      out.writeBigInt64BE(item.value, at);
      break;
    case 'Boolean':
      out.writeBigUInt64BE(item.value ? 1n : 0n, at);
      break;
    case 'BigInteger':
      // Two's complement in `length` bytes, through hex in one step (a byte at a time costs the square of the length).
      out.write(BigInt.asUintN(length * 8, item.value).toString(16).padStart(length * 2, '0'), at, 'hex');
      break;
    case 'TextString':
      out.write(item.value, at, 'utf8');
      break;
    case 'ByteString':
      item.value.copy(out, at);
      break;
  }
  // The buffer is zero-filled (Buffer.alloc), so the padding already is.
  return offset + 8 + pad8(length);
}

/**
 * Encodes one item (usually a whole message) into a fresh zero-filled buffer of exactly its size. The buffer
 * holds every Byte String's bytes: zeroize it after use when one of them is secret.
 */
export function encode(item: Ttlv): Buffer {
  const out = Buffer.alloc(encodedLength(item));
  writeItem(item, out, 0);
  return out;
}

// ---- decoding ---------------------------------------------------------------------------------------------

export interface DecodeOptions {
  /** Refuse inputs larger than this (bytes). Default 1 MiB. */
  maxBytes?: number;
  /** Refuse structures nested deeper than this. Default 32. */
  maxDepth?: number;
}

export const DEFAULT_MAX_BYTES = 1 << 20;
const DEFAULT_MAX_DEPTH = 32;

const TYPE_NAMES = new Map<number, ItemTypeName>(Object.entries(ItemType).map(([name, code]) => [code, name as ItemTypeName]));
const FIXED_LENGTH: Partial<Record<ItemTypeName, number>> = {
  Integer: 4,
  Enumeration: 4,
  Interval: 4,
  LongInteger: 8,
  Boolean: 8,
  DateTime: 8,
  DateTimeExtended: 8,
};
const utf8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });
const hex = (n: number, digits: number) => `0x${n.toString(16).padStart(digits, '0')}`;

/** The header of the item at `offset`: tag, type and declared value length, checked against `end`. */
export function readHeader(buf: Buffer, offset: number, end: number): { tag: number; type: ItemTypeName; length: number; next: number } {
  if (end - offset < 8) throw new TtlvError(`truncated item header at byte ${offset}`);
  const tag = buf.readUIntBE(offset, 3);
  const first = tag >> 16;
  // KMIP tags start with 0x42 (defined by the spec) or 0x54 (extensions).
  if (first !== 0x42 && first !== 0x54) throw new TtlvError(`invalid tag ${hex(tag, 6)} at byte ${offset}`);
  const code = buf.readUInt8(offset + 3);
  const type = TYPE_NAMES.get(code);
  if (!type) throw new TtlvError(`unknown item type ${hex(code, 2)} for tag ${hex(tag, 6)} at byte ${offset}`);
  const length = buf.readUInt32BE(offset + 4);
  const fixed = FIXED_LENGTH[type];
  if (fixed !== undefined && length !== fixed) throw new TtlvError(`${type} ${hex(tag, 6)} has length ${length}, must be ${fixed}`);
  if (type === 'BigInteger' && (length === 0 || length % 8 !== 0)) throw new TtlvError(`BigInteger ${hex(tag, 6)} has length ${length}, must be a positive multiple of 8`);
  if (type === 'Structure' && length % 8 !== 0) throw new TtlvError(`Structure ${hex(tag, 6)} has length ${length}, must be a multiple of 8`);
  const next = offset + 8 + pad8(length);
  // Compared as numbers: a hostile length near 2^32 cannot wrap around.
  if (next > end) {
    throw new TtlvError(`${type} ${hex(tag, 6)} at byte ${offset} claims ${length} bytes (${pad8(length)} with padding), only ${end - offset - 8} remain`);
  }
  return { tag, type, length, next };
}

function checkPadding(buf: Buffer, from: number, to: number, tag: number): void {
  for (let i = from; i < to; i++) if (buf[i] !== 0) throw new TtlvError(`non-zero padding after ${hex(tag, 6)}`);
}

function readItem(buf: Buffer, offset: number, end: number, depth: number, maxDepth: number): { item: Ttlv; next: number } {
  const { tag, type, length, next } = readHeader(buf, offset, end);
  const at = offset + 8;
  checkPadding(buf, at + length, next, tag);
  switch (type) {
    case 'Structure': {
      if (depth >= maxDepth) throw new TtlvError(`structures nested deeper than ${maxDepth}`);
      const value: Ttlv[] = [];
      let cursor = at;
      while (cursor < at + length) {
        const child = readItem(buf, cursor, at + length, depth + 1, maxDepth);
        value.push(child.item);
        cursor = child.next;
      }
      return { item: { tag, type, value }, next };
    }
    case 'Integer':
      return { item: { tag, type, value: buf.readInt32BE(at) }, next };
    case 'Enumeration':
    case 'Interval':
      return { item: { tag, type, value: buf.readUInt32BE(at) }, next };
    case 'LongInteger':
    case 'DateTime':
    case 'DateTimeExtended':
      return { item: { tag, type, value: buf.readBigInt64BE(at) }, next };
    case 'Boolean': {
      const v = buf.readBigUInt64BE(at);
      if (v > 1n) throw new TtlvError(`Boolean ${hex(tag, 6)} holds ${v}, must be 0 or 1`);
      return { item: { tag, type, value: v === 1n }, next };
    }
    case 'BigInteger': {
      // From hex in one step: shifting in a byte at a time costs the square of the length (a server's 1 MiB
      // Big Integer would hold the event loop for over a minute). The length is a positive multiple of 8 (checked above).
      const v = BigInt(`0x${buf.toString('hex', at, at + length)}`);
      return { item: { tag, type, value: BigInt.asIntN(length * 8, v) }, next };
    }
    case 'TextString': {
      let value: string;
      try {
        value = utf8.decode(buf.subarray(at, at + length));
      } catch {
        throw new TtlvError(`TextString ${hex(tag, 6)} is not valid UTF-8`);
      }
      return { item: { tag, type, value }, next };
    }
    case 'ByteString':
      return { item: { tag, type, value: buf.subarray(at, at + length) }, next };
  }
}

/** Decodes exactly one item that fills `buf` (trailing bytes are an error). Byte Strings are views of `buf`. */
export function decode(buf: Buffer, opts: DecodeOptions = {}): Ttlv {
  const maxBytes = opts.maxBytes ?? DEFAULT_MAX_BYTES;
  if (buf.length > maxBytes) throw new TtlvError(`message of ${buf.length} bytes exceeds the limit of ${maxBytes}`);
  const { item, next } = readItem(buf, 0, buf.length, 0, opts.maxDepth ?? DEFAULT_MAX_DEPTH);
  if (next !== buf.length) throw new TtlvError(`${buf.length - next} trailing bytes after the item`);
  return item;
}

// ---- reading decoded structures ---------------------------------------------------------------------------

const tagName = (tag: number) => hex(tag, 6);

/** The children of a Structure (an error for any other type). */
export function fields(item: Ttlv): Ttlv[] {
  if (item.type !== 'Structure') throw new TtlvError(`${tagName(item.tag)} is a ${item.type}, expected a Structure`);
  return item.value;
}

export function findAll(parent: Ttlv, tag: number): Ttlv[] {
  return fields(parent).filter((c) => c.tag === tag);
}

/** The only child with `tag`, of type `type`; undefined when absent; an error when repeated or of another type. */
export function optional<T extends ItemTypeName>(parent: Ttlv, tag: number, type: T): TtlvOf<T> | undefined {
  const found = findAll(parent, tag);
  if (found.length === 0) return undefined;
  if (found.length > 1) throw new TtlvError(`${tagName(tag)} appears ${found.length} times in ${tagName(parent.tag)}`);
  const item = found[0] as Ttlv;
  if (item.type !== type) throw new TtlvError(`${tagName(tag)} is a ${item.type}, expected a ${type}`);
  return item as TtlvOf<T>;
}

export function required<T extends ItemTypeName>(parent: Ttlv, tag: number, type: T): TtlvOf<T> {
  const item = optional(parent, tag, type);
  if (!item) throw new TtlvError(`${tagName(parent.tag)} has no ${tagName(tag)}`);
  return item;
}
