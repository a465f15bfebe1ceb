/*
 * The KMIP tags and enumeration values keyferry uses (KMIP 1.4 §9.1.3, KMIP 2.0 §11). Only what the client
 * and its tests need; an unknown tag or value from a server is carried through as its number.
 */

/** Item Type byte of a TTLV item (KMIP 1.4 §9.1.1.2; Date-Time Extended is KMIP 2.0). */
export const ItemType = {
  Structure: 0x01,
  Integer: 0x02,
  LongInteger: 0x03,
  BigInteger: 0x04,
  Enumeration: 0x05,
  Boolean: 0x06,
  TextString: 0x07,
  ByteString: 0x08,
  DateTime: 0x09,
  Interval: 0x0a,
  DateTimeExtended: 0x0b,
} as const;
export type ItemTypeName = keyof typeof ItemType;

export const Tag = {
  ActivationDate: 0x420001,
  Attribute: 0x420008,
  AttributeIndex: 0x420009,
  AttributeName: 0x42000a,
  AttributeValue: 0x42000b,
  BatchCount: 0x42000d,
  BatchItem: 0x42000f,
  CryptographicAlgorithm: 0x420028,
  CryptographicLength: 0x42002a,
  CryptographicUsageMask: 0x42002c,
  Key: 0x42003f,
  KeyBlock: 0x420040,
  KeyCompressionType: 0x420041,
  KeyFormatType: 0x420042,
  KeyMaterial: 0x420043,
  KeyValue: 0x420045,
  KeyWrappingData: 0x420046,
  MaximumItems: 0x42004f,
  MaximumResponseSize: 0x420050,
  Name: 0x420053,
  NameType: 0x420054,
  NameValue: 0x420055,
  ObjectType: 0x420057,
  Operation: 0x42005c,
  ProtocolVersion: 0x420069,
  ProtocolVersionMajor: 0x42006a,
  ProtocolVersionMinor: 0x42006b,
  RequestHeader: 0x420077,
  RequestMessage: 0x420078,
  RequestPayload: 0x420079,
  ResponseHeader: 0x42007a,
  ResponseMessage: 0x42007b,
  ResponsePayload: 0x42007c,
  ResultMessage: 0x42007d,
  ResultReason: 0x42007e,
  ResultStatus: 0x42007f,
  RevocationReason: 0x420081,
  RevocationReasonCode: 0x420082,
  SecretData: 0x420085,
  SecretDataType: 0x420086,
  State: 0x42008d,
  SymmetricKey: 0x42008f,
  TemplateAttribute: 0x420091,
  TimeStamp: 0x420092,
  UniqueBatchItemId: 0x420093,
  UniqueIdentifier: 0x420094,
  LocatedItems: 0x4200d5,
  /** KMIP 2.0: the Attributes structure that replaces Template-Attribute and lists of Attribute. */
  Attributes: 0x420125,
  /** KMIP 2.0: names an attribute by its tag (an Enumeration holding the tag) in Get Attributes. */
  AttributeReference: 0x42013b,
} as const;

export const Operation = {
  Create: 0x01,
  Register: 0x03,
  Locate: 0x08,
  Get: 0x0a,
  GetAttributes: 0x0b,
  Activate: 0x12,
  Revoke: 0x13,
  Destroy: 0x14,
  DiscoverVersions: 0x1e,
} as const;

export const ObjectType = {
  Certificate: 0x01,
  SymmetricKey: 0x02,
  PublicKey: 0x03,
  PrivateKey: 0x04,
  SplitKey: 0x05,
  Template: 0x06,
  SecretData: 0x07,
  OpaqueObject: 0x08,
  PgpKey: 0x09,
  CertificateRequest: 0x0a,
} as const;

export const CryptographicAlgorithm = {
  DES: 0x01,
  TripleDES: 0x02,
  AES: 0x03,
  RSA: 0x04,
  HmacSha256: 0x09,
} as const;

export const KeyFormatType = {
  Raw: 0x01,
  Opaque: 0x02,
  TransparentSymmetricKey: 0x07,
} as const;

export const NameType = { UninterpretedTextString: 0x01, Uri: 0x02 } as const;

export const State = {
  PreActive: 0x01,
  Active: 0x02,
  Deactivated: 0x03,
  Compromised: 0x04,
  Destroyed: 0x05,
  DestroyedCompromised: 0x06,
} as const;

export const CryptographicUsageMask = { Encrypt: 0x04, Decrypt: 0x08, WrapKey: 0x10, UnwrapKey: 0x20, Export: 0x40 } as const;

export const SecretDataType = { Password: 0x01, Seed: 0x02 } as const;

export const RevocationReasonCode = { Unspecified: 0x01, KeyCompromise: 0x02 } as const;

export const ResultStatus = { Success: 0x00, OperationFailed: 0x01, OperationPending: 0x02, OperationUndone: 0x03 } as const;

/** Result Reason values (KMIP 1.4 §9.1.3.2.29; the 2.0 additions that matter here). */
export const ResultReason = {
  ItemNotFound: 0x01,
  ResponseTooLarge: 0x02,
  AuthenticationNotSuccessful: 0x03,
  InvalidMessage: 0x04,
  OperationNotSupported: 0x05,
  MissingData: 0x06,
  InvalidField: 0x07,
  FeatureNotSupported: 0x08,
  OperationCanceledByRequester: 0x09,
  CryptographicFailure: 0x0a,
  IllegalOperation: 0x0b,
  PermissionDenied: 0x0c,
  ObjectArchived: 0x0d,
  IndexOutOfBounds: 0x0e,
  ApplicationNamespaceNotSupported: 0x0f,
  KeyFormatTypeNotSupported: 0x10,
  KeyCompressionTypeNotSupported: 0x11,
  EncodingOptionError: 0x12,
  KeyValueNotPresent: 0x13,
  AttestationRequired: 0x14,
  AttestationFailed: 0x15,
  Sensitive: 0x16,
  NotExtractable: 0x17,
  ObjectAlreadyExists: 0x18,
  ObjectDestroyed: 0x36,
  ObjectNotFound: 0x37,
  NotAuthorised: 0x39,
  ServerLimitExceeded: 0x3a,
  UnsupportedProtocolVersion: 0x3f,
  WrongKeyLifecycleState: 0x43,
  GeneralFailure: 0x100,
} as const;

/** "Result Reason 0x0C (Permission Denied)" for messages; unknown values as hex. */
export function resultReasonName(value: number | undefined): string {
  if (value === undefined) return 'none';
  const name = Object.entries(ResultReason).find(([, v]) => v === value)?.[0];
  return name ? name.replace(/([a-z])([A-Z])/g, '$1 $2') : `0x${value.toString(16)}`;
}

export function nameOf(table: Record<string, number>, value: number | undefined): string {
  if (value === undefined) return 'none';
  return Object.entries(table).find(([, v]) => v === value)?.[0] ?? `0x${value.toString(16)}`;
}

/** A KMIP protocol version; keyferry speaks 1.2, 1.3, 1.4 and 2.0. */
export interface ProtocolVersion {
  major: number;
  minor: number;
}

export const versionString = (v: ProtocolVersion) => `${v.major}.${v.minor}`;
export const isKmip2 = (v: ProtocolVersion) => v.major >= 2;
