import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { KmipProtocolError, KmipResultError, MAX_SERVER_TEXT, serverText } from '../worker/kmip/errors.js';
import { parseResponse, requestMessage } from '../worker/kmip/messages.js';
import {
  attribute1x,
  getAttributesPayload,
  getPayload,
  locateByNamePayload,
  nameValue,
  readGet,
  readGetAttributes,
  readLocate,
} from '../worker/kmip/operations.js';
import { CryptographicAlgorithm, KeyFormatType, ObjectType, Operation, ResultReason, ResultStatus, State, Tag } from '../worker/kmip/tags.js';
import {
  bigInteger,
  boolean,
  byteString,
  dateTime,
  dateTimeExtended,
  decode,
  DEFAULT_MAX_BYTES,
  encode,
  encodedLength,
  enumeration,
  integer,
  interval,
  longInteger,
  structure,
  textString,
  TtlvError,
  type Ttlv,
} from '../worker/kmip/ttlv.js';

/** "42 00 20 | 02 | 00 00 00 04 | ..." as the spec prints it → bytes. */
const hex = (s: string) => Buffer.from(s.replace(/[\s|]/g, ''), 'hex');
const T = 0x420020; // the tag of the spec's examples

describe('TTLV: the KMIP specification examples (KMIP 1.x §9.1.2), byte for byte', () => {
  const examples: [string, Ttlv, string][] = [
    ['an Integer containing the decimal value 8', integer(T, 8), '42 00 20 | 02 | 00 00 00 04 | 00 00 00 08 00 00 00 00'],
    ['a Long Integer containing the decimal value 123456789000000000', longInteger(T, 123456789000000000n), '42 00 20 | 03 | 00 00 00 08 | 01 B6 9B 4B A5 74 92 00'],
    [
      'a Big Integer containing the decimal value 1234567890000000000000000000',
      bigInteger(T, 1234567890000000000000000000n),
      '42 00 20 | 04 | 00 00 00 10 | 00 00 00 00 03 FD 35 EB 6B C2 DF 46 18 08 00 00',
    ],
    ['an Enumeration with value 255', enumeration(T, 255), '42 00 20 | 05 | 00 00 00 04 | 00 00 00 FF 00 00 00 00'],
    ['a Boolean with the value True', boolean(T, true), '42 00 20 | 06 | 00 00 00 08 | 00 00 00 00 00 00 00 01'],
    ['a Text String with the value "Hello World"', textString(T, 'Hello World'), '42 00 20 | 07 | 00 00 00 0B | 48 65 6C 6C 6F 20 57 6F 72 6C 64 00 00 00 00 00'],
    ['a Byte String with the value { 0x01, 0x02, 0x03 }', byteString(T, Buffer.from([1, 2, 3])), '42 00 20 | 08 | 00 00 00 03 | 01 02 03 00 00 00 00 00'],
    ['a Date-Time for Friday, March 14, 2008, 11:56:40 GMT', dateTime(T, new Date('2008-03-14T11:56:40Z')), '42 00 20 | 09 | 00 00 00 08 | 00 00 00 00 47 DA 67 F8'],
    ['an Interval for 10 days', interval(T, 10 * 86_400), '42 00 20 | 0A | 00 00 00 04 | 00 0D 2F 00 00 00 00 00'],
    [
      'a Structure containing an Enumeration, value 254, followed by an Integer, value 255, having tags 420004 and 420005',
      structure(T, [enumeration(0x420004, 254), integer(0x420005, 255)]),
      '42 00 20 | 01 | 00 00 00 20 | 42 00 04 | 05 | 00 00 00 04 | 00 00 00 FE 00 00 00 00 | 42 00 05 | 02 | 00 00 00 04 | 00 00 00 FF 00 00 00 00',
    ],
  ];

  for (const [what, item, bytes] of examples) {
    it(`when ${what} is encoded, then the bytes are the spec's; decoding them gives it back`, () => {
      expect(encode(item).toString('hex')).toBe(hex(bytes).toString('hex'));
      expect(encodedLength(item)).toBe(hex(bytes).length);
      expect(decode(hex(bytes))).toEqual(item);
    });
  }

  it('when the KMIP 1.1 test documents\' 2048-bit Big Integer (§5.1, §13.3) and -1000 are encoded, then the bytes match PyKMIP\'s vectors', () => {
    const big = BigInt(
      '7457069736858385789461267121745307671725513115539627550456476158315899148268876158582639566401239193216235126746176682996459367959367933668651657801650667092957780500457311053537801217832331855653642048699620062581855949654136874779103225750833216200412156201772772159096834586599791505043949123930975157363117571140205992199598275556938537304302223619504767649529928402958490536347023158748753623556828429244514869387350220071208286199508378399572022455338838078028390162249415071016709848797960500969432640102143437177607858670997694729983438322541806911218953730777201571643529497358482684822484513735382434823977',
    );
    const bigBytes =
      '420000 04 00000100' +
      '3b12455d53c1816516c518493f6398aafa72b17dfa894db888a7d48c0a47f62579a4e644f86da711fec850cdd9dbbd17' +
      'f69a443d2ec1dd60d3c618fa74cde5fdafabd6baa26eb0a3adb4def6480fb1218cd3b083e252e885b6f0729f98b2144d' +
      '2b72293e1b11d73393bc41f75b15ee3d7569b4995ed1a14425da4319b7b26b0e8fef17c37542ae5c6d5849f87209567f' +
      '3925a47b016d564859717bc57fcb4522d0aa49ce816e5be7b3088193236ec9efff140858045b73c5d79baf38f7c67f04' +
      'c5dcf0e3806ad982d1259058c3473e847179a878f2c6b3bd968fb99ea46e9185892f3676e78965c2aed4877ba3917df0' +
      '7c5e927474f19e764ba61dc38d63bf29';
    expect(encode(bigInteger(0x420000, big)).toString('hex')).toBe(hex(bigBytes).toString('hex'));
    expect(decode(hex(bigBytes))).toEqual(bigInteger(0x420000, big));
    expect(encode(bigInteger(0x420000, -1000n)).toString('hex')).toBe('4200000400000008fffffffffffffc18');
    expect(encode(bigInteger(0x420000, 0n)).toString('hex')).toBe('42000004000000080000000000000000');
    // A positive value whose top bit is set needs a sign byte, hence 16 bytes; a negative one sign-extends.
    expect(encode(bigInteger(T, 1n << 63n)).subarray(8).toString('hex')).toBe('00000000000000008000000000000000');
    expect(encode(bigInteger(T, -(1n << 63n))).subarray(8).toString('hex')).toBe('8000000000000000');
    expect(decode(encode(bigInteger(T, -(1n << 200n))))).toEqual(bigInteger(T, -(1n << 200n)));
  });

  it('when a Date-Time Extended (KMIP 2.0) and negative Integers and Long Integers are encoded, then they come back exactly', () => {
    for (const item of [dateTimeExtended(T, 1_205_495_800_123_456n), integer(T, -1), integer(T, -0x8000_0000), longInteger(T, -(1n << 63n)), boolean(T, false), textString(T, ''), byteString(T, Buffer.alloc(0))]) {
      const bytes = encode(item);
      expect(bytes.length % 8).toBe(0);
      expect(decode(bytes)).toEqual(item);
    }
    expect(encode(dateTimeExtended(T, 1n)).toString('hex')).toBe('4200200b000000080000000000000001');
    expect(encode(textString(T, '')).toString('hex')).toBe('4200200700000000'); // no value, no padding
  });
});

describe('TTLV: whole messages from the KMIP 1.1 test cases (via PyKMIP\'s unit tests)', () => {
  const LOCATE_REQUEST = hex(
    '42 00 78 01 00 00 00 d0 42 00 77 01 00 00 00 38 42 00 69 01 00 00 00 20 42 00 6a 02 00 00 00 04' +
      '00 00 00 01 00 00 00 00 42 00 6b 02 00 00 00 04 00 00 00 01 00 00 00 00 42 00 0d 02 00 00 00 04' +
      '00 00 00 01 00 00 00 00 42 00 0f 01 00 00 00 88 42 00 5c 05 00 00 00 04 00 00 00 08 00 00 00 00' +
      '42 00 79 01 00 00 00 70 42 00 08 01 00 00 00 28 42 00 0a 07 00 00 00 0b 4f 62 6a 65 63 74 20 54' +
      '79 70 65 00 00 00 00 00 42 00 0b 05 00 00 00 04 00 00 00 02 00 00 00 00 42 00 08 01 00 00 00 38' +
      '42 00 0a 07 00 00 00 04 4e 61 6d 65 00 00 00 00 42 00 0b 01 00 00 00 20 42 00 55 07 00 00 00 04' +
      '4b 65 79 31 00 00 00 00 42 00 54 05 00 00 00 04 00 00 00 01 00 00 00 00',
  );
  const GET_REQUEST = hex(
    '42 00 78 01 00 00 00 90 42 00 77 01 00 00 00 38 42 00 69 01 00 00 00 20 42 00 6a 02 00 00 00 04' +
      '00 00 00 01 00 00 00 00 42 00 6b 02 00 00 00 04 00 00 00 01 00 00 00 00 42 00 0d 02 00 00 00 04' +
      '00 00 00 01 00 00 00 00 42 00 0f 01 00 00 00 48 42 00 5c 05 00 00 00 04 00 00 00 0a 00 00 00 00' +
      '42 00 79 01 00 00 00 30 42 00 94 07 00 00 00 24 34 39 61 31 63 61 38 38 2d 36 62 65 61 2d 34 66' +
      '62 32 2d 62 34 35 30 2d 37 65 35 38 38 30 32 63 33 30 33 38 00 00 00 00',
  );
  const GET_RESPONSE = hex(
    '42 00 7b 01 00 00 01 28 42 00 7a 01 00 00 00 48 42 00 69 01 00 00 00 20 42 00 6a 02 00 00 00 04' +
      '00 00 00 01 00 00 00 00 42 00 6b 02 00 00 00 04 00 00 00 01 00 00 00 00 42 00 92 09 00 00 00 08' +
      '00 00 00 00 4f 9a 54 e7 42 00 0d 02 00 00 00 04 00 00 00 01 00 00 00 00 42 00 0f 01 00 00 00 d0' +
      '42 00 5c 05 00 00 00 04 00 00 00 0a 00 00 00 00 42 00 7f 05 00 00 00 04 00 00 00 00 00 00 00 00' +
      '42 00 7c 01 00 00 00 a8 42 00 57 05 00 00 00 04 00 00 00 02 00 00 00 00 42 00 94 07 00 00 00 24' +
      '34 39 61 31 63 61 38 38 2d 36 62 65 61 2d 34 66 62 32 2d 62 34 35 30 2d 37 65 35 38 38 30 32 63' +
      '33 30 33 38 00 00 00 00 42 00 8f 01 00 00 00 60 42 00 40 01 00 00 00 58 42 00 42 05 00 00 00 04' +
      '00 00 00 01 00 00 00 00 42 00 45 01 00 00 00 20 42 00 43 08 00 00 00 18 73 67 57 80 51 01 2a 6d' +
      '13 4a 85 5e 25 c8 cd 5e 4c a1 31 45 57 29 d3 c8 42 00 28 05 00 00 00 04 00 00 00 02 00 00 00 00' +
      '42 00 2a 02 00 00 00 04 00 00 00 a8 00 00 00 00',
  );
  const LOCATE_RESPONSE = hex(
    '42 00 7b 01 00 00 00 b0 42 00 7a 01 00 00 00 48 42 00 69 01 00 00 00 20 42 00 6a 02 00 00 00 04' +
      '00 00 00 01 00 00 00 00 42 00 6b 02 00 00 00 04 00 00 00 01 00 00 00 00 42 00 92 09 00 00 00 08' +
      '00 00 00 00 4f 9a 54 e6 42 00 0d 02 00 00 00 04 00 00 00 01 00 00 00 00 42 00 0f 01 00 00 00 58' +
      '42 00 5c 05 00 00 00 04 00 00 00 08 00 00 00 00 42 00 7f 05 00 00 00 04 00 00 00 00 00 00 00 00' +
      '42 00 7c 01 00 00 00 30 42 00 94 07 00 00 00 24 34 39 61 31 63 61 38 38 2d 36 62 65 61 2d 34 66' +
      '62 32 2d 62 34 35 30 2d 37 65 35 38 38 30 32 63 33 30 33 38 00 00 00 00',
  );
  const INVALID_MESSAGE_RESPONSE = hex(
    '42 00 7b 01 00 00 00 b0 42 00 7a 01 00 00 00 48 42 00 69 01 00 00 00 20 42 00 6a 02 00 00 00 04' +
      '00 00 00 01 00 00 00 00 42 00 6b 02 00 00 00 04 00 00 00 01 00 00 00 00 42 00 92 09 00 00 00 08' +
      '00 00 00 00 56 fa 43 bd 42 00 0d 02 00 00 00 04 00 00 00 01 00 00 00 00 42 00 0f 01 00 00 00 58' +
      '42 00 7f 05 00 00 00 04 00 00 00 01 00 00 00 00 42 00 7e 05 00 00 00 04 00 00 00 04 00 00 00 00' +
      '42 00 7d 07 00 00 00 2a 44 65 66 61 75 6c 74 20 72 65 73 70 6f 6e 73 65 2e 20 4e 6f 20 6f 70 65' +
      '72 61 74 69 6f 6e 73 20 73 75 70 70 6f 72 74 65 64 2e 00 00 00 00 00 00',
  );
  const V11 = { major: 1, minor: 1 };
  const UID = '49a1ca88-6bea-4fb2-b450-7e58802c3038';

  it('when the test case 3.1.3 Locate (Object Type Symmetric Key, Name "Key1") is built, then the request is byte-identical', () => {
    const msg = requestMessage({
      version: V11,
      operation: Operation.Locate,
      payload: [attribute1x('Object Type', enumeration(Tag.ObjectType, ObjectType.SymmetricKey)), attribute1x('Name', nameValue('Key1'))],
    });
    expect(encode(msg).toString('hex')).toBe(LOCATE_REQUEST.toString('hex'));
    expect(encode(decode(LOCATE_REQUEST))).toEqual(LOCATE_REQUEST);
  });

  it('when a KMIP 1.x Locate by name is built by the client, then it is the test case\'s Name attribute (and Maximum Items first)', () => {
    const payload = structure(Tag.RequestPayload, locateByNamePayload(V11, 'Key1', 2));
    const nameAttribute = LOCATE_REQUEST.subarray(LOCATE_REQUEST.length - 64); // the test case's second Attribute
    expect(encode(payload).subarray(8 + 16).toString('hex')).toBe(nameAttribute.toString('hex'));
    expect((payload.value as Ttlv[])[0]).toEqual(integer(Tag.MaximumItems, 2));
  });

  it('when the test case Get request is built, then it is byte-identical', () => {
    expect(encode(requestMessage({ version: V11, operation: Operation.Get, payload: getPayload(UID) })).toString('hex')).toBe(GET_REQUEST.toString('hex'));
  });

  it('when the test case Get response is read, then every field is found, and re-encoding gives the same bytes', () => {
    const res = parseResponse(decode(GET_RESPONSE));
    expect(res.version).toEqual(V11);
    expect(res.timeStamp).toBe(0x4f9a54e7n);
    expect(res.items).toHaveLength(1);
    const item = res.items[0];
    expect(item).toMatchObject({ operation: Operation.Get, resultStatus: ResultStatus.Success, resultReason: undefined });
    const obj = readGet(item?.payload);
    expect(obj).toMatchObject({ objectType: ObjectType.SymmetricKey, uid: UID, keyFormatType: KeyFormatType.Raw, cryptographicAlgorithm: CryptographicAlgorithm.TripleDES, cryptographicLength: 168, wrapped: false });
    expect(obj.material?.toString('hex')).toBe('7367578051012a6d134a855e25c8cd5e4ca131455729d3c8');
    expect(encode(decode(GET_RESPONSE))).toEqual(GET_RESPONSE);
  });

  it('when a Get response is decoded, then the key material is a view of the frame: zeroizing the frame wipes it', () => {
    const frame = Buffer.from(GET_RESPONSE);
    const obj = readGet(parseResponse(decode(frame)).items[0]?.payload);
    expect(obj.material?.every((b) => b === 0)).toBe(false);
    frame.fill(0);
    expect(obj.material?.every((b) => b === 0)).toBe(true);
  });

  it('when the test case Locate response is read, then the Unique Identifier is found', () => {
    expect(readLocate(parseResponse(decode(LOCATE_RESPONSE)).items[0]?.payload)).toEqual([UID]);
  });

  it('when a server answers Invalid Message without an operation, then the failure is read with its reason and message', () => {
    const res = parseResponse(decode(INVALID_MESSAGE_RESPONSE));
    expect(res.items[0]).toEqual({
      operation: undefined,
      resultStatus: ResultStatus.OperationFailed,
      resultReason: ResultReason.InvalidMessage,
      resultMessage: 'Default response. No operations supported.',
      payload: undefined,
    });
  });

  it('when a response\'s Batch Count disagrees with its items, or it is no Response Message, then it is a protocol error', () => {
    const tampered = Buffer.from(LOCATE_RESPONSE);
    tampered.writeInt32BE(2, 80); // the Response Header's Batch Count: 1 → 2
    expect(() => parseResponse(decode(tampered))).toThrow(KmipProtocolError);
    expect(() => parseResponse(decode(GET_REQUEST))).toThrow(/expected a Response Message/);
  });
});

describe('KMIP 1.x and 2.0 attribute encodings', () => {
  const V14 = { major: 1, minor: 4 };
  const V20 = { major: 2, minor: 0 };

  it('when locating by name in 2.0, then the Name sits in an Attributes structure; in 1.x in an Attribute with its name', () => {
    expect(locateByNamePayload(V20, 'k')).toEqual([structure(Tag.Attributes, [structure(Tag.Name, [textString(Tag.NameValue, 'k'), enumeration(Tag.NameType, 1)])])]);
    expect(locateByNamePayload(V14, 'k')).toEqual([
      structure(Tag.Attribute, [textString(Tag.AttributeName, 'Name'), structure(Tag.AttributeValue, [textString(Tag.NameValue, 'k'), enumeration(Tag.NameType, 1)])]),
    ]);
  });

  it('when asking for attributes in 2.0, then Attribute References carry the tags; in 1.x Attribute Names carry the names', () => {
    expect(getAttributesPayload(V20, '7', ['objectType', 'cryptographicLength'])).toEqual([
      textString(Tag.UniqueIdentifier, '7'),
      enumeration(Tag.AttributeReference, Tag.ObjectType),
      enumeration(Tag.AttributeReference, Tag.CryptographicLength),
    ]);
    expect(getAttributesPayload(V14, '7', ['objectType', 'name'])).toEqual([textString(Tag.UniqueIdentifier, '7'), textString(Tag.AttributeName, 'Object Type'), textString(Tag.AttributeName, 'Name')]);
  });

  it('when Get Attributes answers in either shape, then the same attributes are read', () => {
    const name = (n: string, tag: number) => structure(tag, [textString(Tag.NameValue, n), enumeration(Tag.NameType, 1)]);
    const v1 = structure(Tag.ResponsePayload, [
      textString(Tag.UniqueIdentifier, '7'),
      attribute1x('Object Type', enumeration(0, ObjectType.SymmetricKey)),
      attribute1x('Cryptographic Algorithm', enumeration(0, CryptographicAlgorithm.AES)),
      attribute1x('Cryptographic Length', integer(0, 256)),
      attribute1x('Name', name('a', 0), 0),
      attribute1x('Name', name('b', 0), 1),
      attribute1x('State', enumeration(0, State.Active)),
      attribute1x('Unknown Vendor Thing', textString(0, 'x')),
    ]);
    const v2 = structure(Tag.ResponsePayload, [
      textString(Tag.UniqueIdentifier, '7'),
      structure(Tag.Attributes, [
        enumeration(Tag.ObjectType, ObjectType.SymmetricKey),
        enumeration(Tag.CryptographicAlgorithm, CryptographicAlgorithm.AES),
        integer(Tag.CryptographicLength, 256),
        name('a', Tag.Name),
        name('b', Tag.Name),
        enumeration(Tag.State, State.Active),
        textString(0x540001, 'vendor extension'),
      ]),
    ]);
    const expected = { uid: '7', attributes: { objectType: 2, cryptographicAlgorithm: 3, cryptographicLength: 256, state: 2, names: ['a', 'b'] } };
    expect(readGetAttributes(V14, decode(encode(v1)))).toEqual(expected);
    expect(readGetAttributes(V20, decode(encode(v2)))).toEqual(expected);
    // An attribute of the wrong type is a protocol error, not a silent misreading.
    const bad = structure(Tag.ResponsePayload, [textString(Tag.UniqueIdentifier, '7'), structure(Tag.Attributes, [textString(Tag.CryptographicLength, '256')])]);
    expect(() => readGetAttributes(V20, bad)).toThrow(KmipProtocolError);
  });

  it('when Get returns a Transparent Symmetric Key or a wrapped key, then its Key is read, or it is marked wrapped with no material', () => {
    const key = Buffer.alloc(32, 7);
    const transparent = structure(Tag.ResponsePayload, [
      enumeration(Tag.ObjectType, ObjectType.SymmetricKey),
      textString(Tag.UniqueIdentifier, 'u'),
      structure(Tag.SymmetricKey, [
        structure(Tag.KeyBlock, [
          enumeration(Tag.KeyFormatType, KeyFormatType.TransparentSymmetricKey),
          structure(Tag.KeyValue, [structure(Tag.KeyMaterial, [byteString(Tag.Key, key)])]),
          enumeration(Tag.CryptographicAlgorithm, CryptographicAlgorithm.AES),
          integer(Tag.CryptographicLength, 256),
        ]),
      ]),
    ]);
    expect(readGet(transparent)).toMatchObject({ keyFormatType: KeyFormatType.TransparentSymmetricKey, material: key, wrapped: false });
    const wrapped = structure(Tag.ResponsePayload, [
      enumeration(Tag.ObjectType, ObjectType.SymmetricKey),
      textString(Tag.UniqueIdentifier, 'u'),
      structure(Tag.SymmetricKey, [
        structure(Tag.KeyBlock, [enumeration(Tag.KeyFormatType, KeyFormatType.Raw), byteString(Tag.KeyValue, Buffer.alloc(40, 1)), structure(Tag.KeyWrappingData, [enumeration(0x42009e, 1)])]),
      ]),
    ]);
    const got = readGet(wrapped);
    expect(got.wrapped).toBe(true);
    expect(got.material).toBeUndefined();
  });
});

describe('TTLV decoding never trusts a length', () => {
  const int8 = hex('42 00 20 | 02 | 00 00 00 04 | 00 00 00 08 00 00 00 00');
  const cases: [string, Buffer, RegExp][] = [
    ['a truncated header', int8.subarray(0, 7), /truncated item header/],
    ['a truncated value', int8.subarray(0, 12), /claims 4 bytes \(8 with padding\), only 4 remain/],
    ['a value without its padding', hex('42 00 20 | 07 | 00 00 00 03 | 41 42 43'), /claims 3 bytes \(8 with padding\), only 3 remain/],
    ['an Integer of length 8', hex('42 00 20 | 02 | 00 00 00 08 | 00 00 00 08 00 00 00 00'), /Integer 0x420020 has length 8, must be 4/],
    ['a Long Integer of length 4', hex('42 00 20 | 03 | 00 00 00 04 | 00 00 00 08 00 00 00 00'), /must be 8/],
    ['an Enumeration of length 0', hex('42 00 20 | 05 | 00 00 00 00'), /must be 4/],
    ['a Boolean of length 1', hex('42 00 20 | 06 | 00 00 00 01 | 01 00 00 00 00 00 00 00'), /must be 8/],
    ['a Date-Time of length 4', hex('42 00 20 | 09 | 00 00 00 04 | 47 DA 67 F8 00 00 00 00'), /must be 8/],
    ['an Interval of length 8', hex('42 00 20 | 0A | 00 00 00 08 | 00 0D 2F 00 00 00 00 00'), /must be 4/],
    ['a Big Integer whose length is no multiple of 8 (PyKMIP\'s bad-length vector: 0x101)', Buffer.concat([hex('42 00 00 | 04 | 00 00 01 01'), Buffer.alloc(264)]), /must be a positive multiple of 8/],
    ['a Big Integer of length 0', hex('42 00 20 | 04 | 00 00 00 00'), /positive multiple of 8/],
    ['a Structure whose length is no multiple of 8', hex('42 00 20 | 01 | 00 00 00 04 | 00 00 00 00 00 00 00 00'), /multiple of 8/],
    ['a Structure claiming more than its parent holds', hex('42 00 20 | 01 | 00 00 00 10 | 42 00 04 | 01 | 00 00 00 10 | 00 00 00 00 00 00 00 00'), /claims 16 bytes \(16 with padding\), only 8 remain/],
    ['a length of 0xFFFFFFFF', hex('42 00 20 | 08 | FF FF FF FF | 00 00 00 00 00 00 00 00'), /claims 4294967295 bytes/],
    ['non-zero padding', hex('42 00 20 | 02 | 00 00 00 04 | 00 00 00 08 00 00 00 01'), /non-zero padding/],
    ['non-zero padding after a Text String', hex('42 00 20 | 07 | 00 00 00 01 | 41 00 00 00 00 00 00 41'), /non-zero padding/],
    ['a Boolean of value 2', hex('42 00 20 | 06 | 00 00 00 08 | 00 00 00 00 00 00 00 02'), /must be 0 or 1/],
    ['a Text String that is not UTF-8', hex('42 00 20 | 07 | 00 00 00 02 | C3 28 00 00 00 00 00 00'), /not valid UTF-8/],
    ['an unknown item type', hex('42 00 20 | 0C | 00 00 00 00'), /unknown item type 0x0c/],
    ['a tag outside the 42xxxx and 54xxxx ranges', hex('43 00 20 | 02 | 00 00 00 04 | 00 00 00 08 00 00 00 00'), /invalid tag 0x430020/],
    ['trailing bytes after the item', Buffer.concat([int8, Buffer.alloc(8)]), /8 trailing bytes/],
  ];
  for (const [what, bytes, message] of cases) {
    it(`when the input has ${what}, then decoding fails with a TtlvError`, () => {
      expect(() => decode(bytes)).toThrow(TtlvError);
      expect(() => decode(bytes)).toThrow(message);
    });
  }

  it('when a server sends a Big Integer as large as a message may be, then it decodes to its value and encodes back (each in one step: a byte at a time, each took minutes)', () => {
    const length = DEFAULT_MAX_BYTES - 8;
    const value = Buffer.alloc(length, 0x5a);
    value[0] = 0x81; // negative: two's complement
    value[length - 1] = 0x03;
    const item = decode(Buffer.concat([hex('42 00 20 | 04'), Buffer.from([length >>> 24, (length >>> 16) & 0xff, (length >>> 8) & 0xff, length & 0xff]), value]));
    expect(item.type).toBe('BigInteger');
    const v = item.value as bigint;
    expect(v < 0n).toBe(true);
    expect(BigInt.asUintN(8, v)).toBe(3n);
    expect(BigInt.asUintN(16, v >> 8n)).toBe(0x5a5an);
    expect(BigInt.asUintN(8, v >> BigInt((length - 1) * 8))).toBe(0x81n);
    expect(encode(item).subarray(8).equals(value)).toBe(true);
  });

  it('when the input is larger than maxBytes or nested deeper than maxDepth, then decoding refuses it', () => {
    expect(() => decode(int8, { maxBytes: 15 })).toThrow(/exceeds the limit of 15/);
    expect(decode(int8, { maxBytes: 16 })).toEqual(integer(T, 8));
    let deep: Ttlv = integer(T, 1);
    for (let i = 0; i < 40; i++) deep = structure(T, [deep]);
    expect(() => decode(encode(deep))).toThrow(/nested deeper than 32/);
    expect(() => decode(encode(deep), { maxDepth: 64 })).not.toThrow();
  });

  it('when a value does not fit its type, then encoding refuses it', () => {
    expect(() => encode(integer(T, 2 ** 31))).toThrow(TtlvError);
    expect(() => encode(integer(T, 1.5))).toThrow(TtlvError);
    expect(() => encode(enumeration(T, -1))).toThrow(TtlvError);
    expect(() => encode(interval(T, 2 ** 32))).toThrow(TtlvError);
    expect(() => encode(longInteger(T, 1n << 63n))).toThrow(TtlvError);
    expect(() => encode(integer(0x1000000, 1))).toThrow(/3 bytes/);
  });
});

describe('TTLV properties (fast-check)', () => {
  const tag = fc.oneof(fc.integer({ min: 0x420000, max: 0x42ffff }), fc.integer({ min: 0x540000, max: 0x54ffff }));
  const leaf: fc.Arbitrary<Ttlv> = fc.oneof(
    fc.record({ tag, type: fc.constant('Integer' as const), value: fc.integer({ min: -0x8000_0000, max: 0x7fff_ffff }) }),
    fc.record({ tag, type: fc.constant('LongInteger' as const), value: fc.bigInt({ min: -(1n << 63n), max: (1n << 63n) - 1n }) }),
    fc.record({ tag, type: fc.constant('BigInteger' as const), value: fc.bigInt({ min: -(1n << 700n), max: 1n << 700n }) }),
    fc.record({ tag, type: fc.constant('Enumeration' as const), value: fc.integer({ min: 0, max: 0xffff_ffff }) }),
    fc.record({ tag, type: fc.constant('Boolean' as const), value: fc.boolean() }),
    fc.record({ tag, type: fc.constant('TextString' as const), value: fc.string({ unit: 'grapheme', maxLength: 40 }) }),
    fc.record({ tag, type: fc.constant('ByteString' as const), value: fc.uint8Array({ maxLength: 70 }).map((a) => Buffer.from(a)) }),
    fc.record({ tag, type: fc.constant('DateTime' as const), value: fc.bigInt({ min: -(1n << 63n), max: (1n << 63n) - 1n }) }),
    fc.record({ tag, type: fc.constant('Interval' as const), value: fc.integer({ min: 0, max: 0xffff_ffff }) }),
    fc.record({ tag, type: fc.constant('DateTimeExtended' as const), value: fc.bigInt({ min: -(1n << 63n), max: (1n << 63n) - 1n }) }),
  );
  const { tree } = fc.letrec<{ tree: Ttlv }>((rec) => ({
    tree: fc.oneof({ depthSize: 'small', withCrossShrink: true }, leaf, fc.record({ tag, type: fc.constant('Structure' as const), value: fc.array(rec('tree'), { maxLength: 5 }) })),
  }));

  it('when any item tree is encoded, then its size is a multiple of 8, matches encodedLength, and it decodes to itself', () => {
    fc.assert(
      fc.property(tree, (item) => {
        const bytes = encode(item);
        expect(bytes.length % 8).toBe(0);
        expect(bytes.length).toBe(encodedLength(item));
        expect(decode(bytes, { maxDepth: 64 })).toEqual(item);
      }),
      { numRuns: 500 },
    );
  });

  it('when an encoding is corrupted or truncated anywhere, then decoding either succeeds or throws a TtlvError, nothing else', () => {
    fc.assert(
      fc.property(tree, fc.nat(), fc.integer({ min: 0, max: 255 }), fc.nat(), (item, at, byte, cut) => {
        const bytes = encode(item);
        const corrupted = Buffer.from(bytes);
        corrupted[at % corrupted.length] = byte;
        for (const input of [corrupted, bytes.subarray(0, cut % (bytes.length + 1))]) {
          try {
            decode(input, { maxDepth: 64 });
          } catch (err) {
            expect(err).toBeInstanceOf(TtlvError);
          }
        }
      }),
      { numRuns: 1000 },
    );
  });

  it('when random bytes are decoded, then the decoder only ever throws TtlvError', () => {
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 0, maxLength: 200 }), (arr) => {
        const withHeader = Buffer.concat([Buffer.from([0x42, 0x00, 0x7b, 0x01]), Buffer.from(arr)]);
        for (const input of [Buffer.from(arr), withHeader]) {
          try {
            decode(input);
          } catch (err) {
            expect(err).toBeInstanceOf(TtlvError);
          }
        }
      }),
      { numRuns: 1000 },
    );
  });
});

describe('server texts (Result Messages) shown to tenants', () => {
  it('when a Result Message holds control characters, line breaks or bidi overrides, then they become single spaces', () => {
    expect(serverText('a\r\nb\u0000c\u001b[2Jd\u0085e\u2028f\u202eg\u2066h  \t i')).toBe('a b c [2Jd e f g h i');
  });

  it('when a Result Message is longer than 200 characters, then it is cut to 200 code points ending in an ellipsis, never inside a surrogate pair', () => {
    expect(MAX_SERVER_TEXT).toBe(200);
    const cut = serverText('x'.repeat(500));
    expect([...cut]).toHaveLength(200);
    expect(cut.endsWith('x…')).toBe(true);
    const emoji = serverText('😀'.repeat(300));
    expect([...emoji]).toHaveLength(200);
    expect(emoji).toBe(`${'😀'.repeat(199)}…`);
    expect(serverText('short')).toBe('short');
  });

  it('when a KmipResultError carries a Result Message, then its message quotes the cleaned, cut text', () => {
    const err = new KmipResultError('Get', ResultStatus.OperationFailed, ResultReason.PermissionDenied, `denied\n${'y'.repeat(400)}`);
    expect(err.message.startsWith('KMIP Get failed: ')).toBe(true);
    expect(err.message).not.toMatch(/\n/);
    expect([...err.message.slice(err.message.indexOf('denied'))]).toHaveLength(200);
  });
});
