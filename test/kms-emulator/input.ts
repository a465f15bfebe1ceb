import { KmsError, validationError } from './errors.js';
import type { Tag } from './store.js';

/** A parsed AWS JSON 1.1 request body. */
export type Input = Record<string, unknown>;

/** AWS names members in validation messages in camelCase ("keyId"). */
function member(name: string): string {
  return name.charAt(0).toLowerCase() + name.slice(1);
}

function wrongType(name: string, expected: string): KmsError {
  return new KmsError('SerializationException', `${name} must be ${expected}`);
}

function missing(name: string): KmsError {
  return validationError(
    `1 validation error detected: Value null at '${member(name)}' failed to satisfy constraint: Member must not be null`,
  );
}

export function lengthError(name: string, bound: 'greater than or equal to' | 'less than or equal to', limit: number) {
  return validationError(
    `1 validation error detected: Value at '${member(name)}' failed to satisfy constraint: ` +
      `Member must have length ${bound} ${limit}`,
  );
}

export function optString(input: Input, name: string): string | undefined {
  const value = input[name];
  if (value === undefined || value === null) return undefined;
  if (typeof value !== 'string') throw wrongType(name, 'a string');
  return value;
}

export function reqString(input: Input, name: string): string {
  const value = optString(input, name);
  if (value === undefined) throw missing(name);
  return value;
}

/** Blobs travel as base64 strings. */
export function reqBlob(input: Input, name: string): Buffer {
  return Buffer.from(reqString(input, name), 'base64');
}

export function optNumber(input: Input, name: string): number | undefined {
  const value = input[name];
  if (value === undefined || value === null) return undefined;
  if (typeof value !== 'number') throw wrongType(name, 'a number');
  return value;
}

export function optBoolean(input: Input, name: string): boolean | undefined {
  const value = input[name];
  if (value === undefined || value === null) return undefined;
  if (typeof value !== 'boolean') throw wrongType(name, 'a boolean');
  return value;
}

/** A map of string to string, such as EncryptionContext. */
export function optStringMap(input: Input, name: string): Record<string, string> | undefined {
  const value = input[name];
  if (value === undefined || value === null) return undefined;
  if (typeof value !== 'object' || Array.isArray(value) || !Object.values(value).every((v) => typeof v === 'string')) {
    throw wrongType(name, 'a map of strings');
  }
  return value as Record<string, string>;
}

export function optTags(input: Input, name: string): Tag[] | undefined {
  const value = input[name];
  if (value === undefined || value === null) return undefined;
  if (!Array.isArray(value)) throw wrongType(name, 'a list of tags');
  return value.map((item: unknown) => {
    if (typeof item !== 'object' || item === null) throw wrongType(name, 'a list of tags');
    const tag = item as Input;
    return { TagKey: reqString(tag, 'TagKey'), TagValue: reqString(tag, 'TagValue') };
  });
}
