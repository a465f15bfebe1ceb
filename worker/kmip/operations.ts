import { KmipProtocolError } from './errors.js';
import { parseProtocolVersion, protocolVersion } from './messages.js';
import { isKmip2, NameType, ObjectType, Tag, type ProtocolVersion } from './tags.js';
import { enumeration, fields, findAll, integer, optional, required, structure, textString, TtlvError, type Ttlv } from './ttlv.js';

/*
 * Request payloads and response readers of the operations keyferry uses: DiscoverVersions, Locate, Get and
 * GetAttributes. Where KMIP 1.x and 2.0 differ, the negotiated version picks the encoding:
 *
 * - 1.x names an attribute with an Attribute structure (Attribute Name text + Attribute Value), lists them
 *   in Locate, and asks Get Attributes for them by Attribute Name text; its answer is a list of Attribute.
 * - 2.0 puts attributes, each under its own tag, in one Attributes structure (Locate, Get Attributes'
 *   answer), and asks Get Attributes for them by Attribute Reference (an Enumeration holding the tag).
 */

/** Turns TTLV shape errors met while reading a payload into protocol errors. */
function reading<T>(what: string, f: () => T): T {
  try {
    return f();
  } catch (err) {
    if (err instanceof TtlvError) throw new KmipProtocolError(`malformed ${what} response: ${err.message}`, { cause: err });
    throw err;
  }
}

// ---- DiscoverVersions ---------------------------------------------------------------------------------

export const discoverVersionsPayload = (offer: ProtocolVersion[]): Ttlv[] => offer.map(protocolVersion);

/** The versions the server supports among those offered, in the server's order of preference. */
export function readDiscoverVersions(payload: Ttlv | undefined): ProtocolVersion[] {
  if (!payload) return [];
  return reading('DiscoverVersions', () => findAll(payload, Tag.ProtocolVersion).map(parseProtocolVersion));
}

// ---- attributes -------------------------------------------------------------------------------------------

/** The attributes keyferry reads: their KMIP 1.x names and tags. */
export const ATTRIBUTES = {
  objectType: { name: 'Object Type', tag: Tag.ObjectType },
  cryptographicAlgorithm: { name: 'Cryptographic Algorithm', tag: Tag.CryptographicAlgorithm },
  cryptographicLength: { name: 'Cryptographic Length', tag: Tag.CryptographicLength },
  name: { name: 'Name', tag: Tag.Name },
  state: { name: 'State', tag: Tag.State },
} as const;
export type AttributeKey = keyof typeof ATTRIBUTES;

/** A KMIP 1.x Attribute structure: `value` is the attribute's value item, whose tag is replaced by Attribute Value. */
export function attribute1x(name: string, value: Ttlv, index?: number): Ttlv {
  return structure(Tag.Attribute, [
    textString(Tag.AttributeName, name),
    index !== undefined ? integer(Tag.AttributeIndex, index) : undefined,
    { ...value, tag: Tag.AttributeValue } as Ttlv,
  ]);
}

/** A Name attribute's value (uninterpreted text), under `tag` (Name in 2.0, Attribute Value inside a 1.x Attribute). */
export const nameValue = (name: string, tag: number = Tag.Name): Ttlv =>
  structure(tag, [textString(Tag.NameValue, name), enumeration(Tag.NameType, NameType.UninterpretedTextString)]);

/**
 * Attributes as the version wants them in a request: 2.0 one Attributes structure with each under its own tag;
 * 1.x one Attribute structure each, in the payload itself (or in a Template-Attribute, which the caller adds).
 */
export function attributesFor(version: ProtocolVersion, attrs: { name: string; value: Ttlv }[]): Ttlv[] {
  if (isKmip2(version)) return [structure(Tag.Attributes, attrs.map((a) => a.value))];
  return attrs.map((a) => attribute1x(a.name, a.value));
}

export interface ObjectAttributes {
  objectType?: number;
  cryptographicAlgorithm?: number;
  cryptographicLength?: number;
  state?: number;
  names: string[];
}

function readName(value: Ttlv): string {
  return required(value, Tag.NameValue, 'TextString').value;
}

/** Fills `out` from one attribute value, known by its 1.x name or its 2.0 tag. */
function absorb(out: ObjectAttributes, key: AttributeKey | undefined, value: Ttlv): void {
  const expect = <T extends Ttlv['type']>(type: T) => {
    if (value.type !== type) throw new TtlvError(`attribute ${key} is a ${value.type}, expected a ${type}`);
    return value as Extract<Ttlv, { type: T }>;
  };
  switch (key) {
    case 'objectType':
      out.objectType = expect('Enumeration').value;
      break;
    case 'cryptographicAlgorithm':
      out.cryptographicAlgorithm = expect('Enumeration').value;
      break;
    case 'cryptographicLength':
      out.cryptographicLength = expect('Integer').value;
      break;
    case 'state':
      out.state = expect('Enumeration').value;
      break;
    case 'name':
      out.names.push(readName(expect('Structure')));
      break;
    default: // an attribute not asked for: ignored
  }
}

const keyByName = new Map<string, AttributeKey>(Object.entries(ATTRIBUTES).map(([k, v]) => [v.name, k as AttributeKey]));
const keyByTag = new Map<number, AttributeKey>(Object.entries(ATTRIBUTES).map(([k, v]) => [v.tag, k as AttributeKey]));

// ---- Locate -----------------------------------------------------------------------------------------------

/** Locate the objects that carry Name `name`; `maxItems` bounds the answer. */
export function locateByNamePayload(version: ProtocolVersion, name: string, maxItems?: number): Ttlv[] {
  return [
    maxItems !== undefined ? integer(Tag.MaximumItems, maxItems) : undefined,
    ...attributesFor(version, [{ name: ATTRIBUTES.name.name, value: nameValue(name) }]),
  ].filter((x): x is Ttlv => x !== undefined);
}

/** The Unique Identifiers found. */
export function readLocate(payload: Ttlv | undefined): string[] {
  if (!payload) return [];
  return reading('Locate', () => {
    fields(payload);
    return findAll(payload, Tag.UniqueIdentifier).map((u) => {
      if (u.type !== 'TextString') throw new TtlvError('a Unique Identifier is not a Text String');
      return u.value;
    });
  });
}

// ---- GetAttributes -----------------------------------------------------------------------------------------

export function getAttributesPayload(version: ProtocolVersion, uid: string, keys: AttributeKey[]): Ttlv[] {
  const refs = isKmip2(version)
    ? keys.map((k) => enumeration(Tag.AttributeReference, ATTRIBUTES[k].tag))
    : keys.map((k) => textString(Tag.AttributeName, ATTRIBUTES[k].name));
  return [textString(Tag.UniqueIdentifier, uid), ...refs];
}

export function readGetAttributes(version: ProtocolVersion, payload: Ttlv | undefined): { uid: string; attributes: ObjectAttributes } {
  if (!payload) throw new KmipProtocolError('GetAttributes answered without a payload');
  return reading('GetAttributes', () => {
    const uid = required(payload, Tag.UniqueIdentifier, 'TextString').value;
    const attributes: ObjectAttributes = { names: [] };
    if (isKmip2(version)) {
      const attrs = optional(payload, Tag.Attributes, 'Structure');
      for (const value of attrs ? fields(attrs) : []) absorb(attributes, keyByTag.get(value.tag), value);
    } else {
      for (const a of findAll(payload, Tag.Attribute)) {
        const name = required(a, Tag.AttributeName, 'TextString').value;
        const values = findAll(a, Tag.AttributeValue);
        if (values.length !== 1) throw new TtlvError(`attribute "${name}" has ${values.length} Attribute Values`);
        absorb(attributes, keyByName.get(name), values[0] as Ttlv);
      }
    }
    return { uid, attributes };
  });
}

// ---- Get --------------------------------------------------------------------------------------------------

export const getPayload = (uid: string): Ttlv[] => [textString(Tag.UniqueIdentifier, uid)];

/** A managed object as Get returns it. `material` is a view of the response frame: zeroize the frame. */
export interface ManagedObject {
  objectType: number;
  uid: string;
  /** For keys (Symmetric Key, Secret Data, ...): the Key Block's fields. */
  keyFormatType?: number;
  cryptographicAlgorithm?: number;
  cryptographicLength?: number;
  /** True when the Key Block carries Key Wrapping Data (the key value is encrypted). */
  wrapped: boolean;
  /** The key bytes: Key Material (Raw, Opaque) or its Key (Transparent Symmetric Key); undefined otherwise. */
  material?: Buffer;
}

const OBJECT_TAGS: Record<number, number> = {
  [ObjectType.SymmetricKey]: Tag.SymmetricKey,
  [ObjectType.SecretData]: Tag.SecretData,
};

export function readGet(payload: Ttlv | undefined): ManagedObject {
  if (!payload) throw new KmipProtocolError('Get answered without a payload');
  return reading('Get', () => {
    const objectType = required(payload, Tag.ObjectType, 'Enumeration').value;
    const uid = required(payload, Tag.UniqueIdentifier, 'TextString').value;
    const objectTag = OBJECT_TAGS[objectType];
    // Other object types (certificates, asymmetric keys, opaque objects) are not read further: they are never the right type.
    const object = objectTag === undefined ? undefined : optional(payload, objectTag, 'Structure');
    if (!object) return { objectType, uid, wrapped: false };
    const block = required(object, Tag.KeyBlock, 'Structure');
    const out: ManagedObject = {
      objectType,
      uid,
      keyFormatType: required(block, Tag.KeyFormatType, 'Enumeration').value,
      cryptographicAlgorithm: optional(block, Tag.CryptographicAlgorithm, 'Enumeration')?.value,
      cryptographicLength: optional(block, Tag.CryptographicLength, 'Integer')?.value,
      wrapped: optional(block, Tag.KeyWrappingData, 'Structure') !== undefined,
    };
    const keyValue = findAll(block, Tag.KeyValue)[0];
    if (!out.wrapped && keyValue?.type === 'Structure') {
      const material = findAll(keyValue, Tag.KeyMaterial)[0];
      if (material?.type === 'ByteString') out.material = material.value;
      else if (material?.type === 'Structure') out.material = optional(material, Tag.Key, 'ByteString')?.value;
    }
    return out;
  });
}
