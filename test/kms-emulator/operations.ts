import {
  CustomerMasterKeySpec,
  EncryptionAlgorithmSpec,
  ExpirationModelType,
  KeySpec,
  OriginType,
} from '@aws-sdk/client-kms';
import { createHash, randomBytes, randomUUID } from 'node:crypto';
import { decryptParsed, encryptWithMaterial, parseCiphertext } from './ciphertext.js';
import { invalidState, KmsError, notFound, validationError } from './errors.js';
import {
  lengthError,
  optBoolean,
  optNumber,
  optString,
  optStringMap,
  optTags,
  reqBlob,
  reqString,
  type Input,
} from './input.js';
import { aliasArn, keyArn, type Caller, type Key, type KeyState, type Store, type Tag } from './store.js';
import type { ImportTokens } from './wrapping.js';

export interface OperationContext {
  store: Store;
  tokens: ImportTokens;
  caller: Caller;
}

type Output = Record<string, unknown>;
type Operation = (ctx: OperationContext, input: Input) => Output | Promise<Output>;

const DAY_MS = 24 * 60 * 60 * 1000;
const MAX_POLICY_BYTES = 32768;
const ALIAS_PATTERN = /^alias\/[a-zA-Z0-9/_-]+$/;
const STATE_TEXT: Record<KeyState, string> = {
  Enabled: 'enabled',
  PendingImport: 'pending import',
  PendingDeletion: 'pending deletion',
};

/** Timestamps travel as epoch seconds. */
function epoch(date: Date): number {
  return date.getTime() / 1000;
}

function defaultPolicy(accountId: string): string {
  return JSON.stringify({
    Version: '2012-10-17',
    Id: 'key-default-1',
    Statement: [
      {
        Sid: 'Enable IAM User Permissions',
        Effect: 'Allow',
        Principal: { AWS: `arn:aws:iam::${accountId}:root` },
        Action: 'kms:*',
        Resource: '*',
      },
    ],
  });
}

function keyMetadata(key: Key): Output {
  return {
    AWSAccountId: key.accountId,
    KeyId: key.keyId,
    Arn: key.arn,
    CreationDate: epoch(key.creationDate),
    Enabled: key.keyState === 'Enabled',
    Description: key.description,
    KeyUsage: 'ENCRYPT_DECRYPT',
    KeyState: key.keyState,
    DeletionDate: key.deletionDate && epoch(key.deletionDate),
    ValidTo: key.validTo && epoch(key.validTo),
    Origin: key.origin,
    ExpirationModel: key.expirationModel,
    KeyManager: 'CUSTOMER',
    CustomerMasterKeySpec: 'SYMMETRIC_DEFAULT',
    KeySpec: 'SYMMETRIC_DEFAULT',
    EncryptionAlgorithms: ['SYMMETRIC_DEFAULT'],
    MultiRegion: key.multiRegion,
    MultiRegionConfiguration: key.multiRegion
      ? { MultiRegionKeyType: 'PRIMARY', PrimaryKey: { Arn: key.arn, Region: key.region }, ReplicaKeys: [] }
      : undefined,
  };
}

/** Checks an enum parameter: unknown values are a ValidationException, known ones the emulator lacks are `unsupported`. */
function checkEnum(
  name: string,
  value: string,
  known: Record<string, string>,
  supported: string[],
  unsupported = 'UnsupportedOperationException',
): void {
  if (!Object.values(known).includes(value)) {
    throw validationError(
      `1 validation error detected: Value '${value}' at '${name}' failed to satisfy constraint: ` +
        `Member must satisfy enum value set: [${Object.values(known).join(', ')}]`,
    );
  }
  if (!supported.includes(value)) {
    throw new KmsError(unsupported, `${name} ${value} is not supported by the KMS emulator.`);
  }
}

function checkPolicy(policy: string): void {
  if (Buffer.byteLength(policy) > MAX_POLICY_BYTES) {
    throw new KmsError('LimitExceededException', `The key policy exceeds ${MAX_POLICY_BYTES} bytes.`);
  }
  let document: unknown;
  try {
    document = JSON.parse(policy);
  } catch {
    throw new KmsError('MalformedPolicyDocumentException', 'The key policy is not valid JSON.');
  }
  if (typeof document !== 'object' || document === null || !('Statement' in document)) {
    throw new KmsError('MalformedPolicyDocumentException', 'The key policy must be a JSON object with a Statement.');
  }
}

/** AWS's limit of tags on one KMS key. */
const MAX_TAGS = 50;

function checkTags(tags: Tag[]): void {
  if (tags.length > MAX_TAGS) throw new KmsError('TagException', `A KMS key can have at most ${MAX_TAGS} tags; the request has ${tags.length}.`);
  const seen = new Set<string>();
  for (const { TagKey, TagValue } of tags) {
    if (TagKey.length < 1) throw lengthError('TagKey', 'greater than or equal to', 1);
    if (TagKey.length > 128) throw lengthError('TagKey', 'less than or equal to', 128);
    if (TagValue.length > 256) throw lengthError('TagValue', 'less than or equal to', 256);
    if (TagKey.toLowerCase().startsWith('aws:')) {
      throw new KmsError('TagException', `Tag key ${TagKey} uses the reserved prefix aws:.`);
    }
    if (seen.has(TagKey)) throw new KmsError('TagException', `Duplicate tag key ${TagKey}.`);
    seen.add(TagKey);
  }
}

function requireState(key: Key, allowed: KeyState[]): void {
  if (!allowed.includes(key.keyState)) throw invalidState(`${key.arn} is ${STATE_TEXT[key.keyState]}.`);
}

function requireExternal(key: Key): void {
  if (key.origin !== 'EXTERNAL') {
    throw new KmsError(
      'UnsupportedOperationException',
      `${key.arn} origin is ${key.origin} which is not valid for this operation.`,
    );
  }
}

/** Material for a cryptographic operation: only an Enabled key has usable material. */
function usableMaterial(key: Key): Buffer {
  if (key.keyState !== 'Enabled' || !key.material) throw invalidState(`${key.arn} is ${STATE_TEXT[key.keyState]}.`);
  return key.material;
}

function checkEncryptionAlgorithm(input: Input): void {
  const algorithm = optString(input, 'EncryptionAlgorithm');
  if (algorithm !== undefined) {
    checkEnum('EncryptionAlgorithm', algorithm, EncryptionAlgorithmSpec, ['SYMMETRIC_DEFAULT'], 'InvalidKeyUsageException');
  }
}

/** ExpirationModel defaults to KEY_MATERIAL_EXPIRES, which requires a ValidTo at most 365 days ahead. */
function expirationOf(input: Input, now: number): { expirationModel: string; validTo: Date | undefined } {
  const expirationModel = optString(input, 'ExpirationModel') ?? 'KEY_MATERIAL_EXPIRES';
  checkEnum('ExpirationModel', expirationModel, ExpirationModelType, Object.values(ExpirationModelType));
  const validToSeconds = optNumber(input, 'ValidTo');
  if (expirationModel === 'KEY_MATERIAL_DOES_NOT_EXPIRE') {
    if (validToSeconds !== undefined) {
      throw validationError('ValidTo must be omitted when ExpirationModel is KEY_MATERIAL_DOES_NOT_EXPIRE.');
    }
    return { expirationModel, validTo: undefined };
  }
  if (validToSeconds === undefined) {
    throw validationError('ValidTo is required when ExpirationModel is KEY_MATERIAL_EXPIRES.');
  }
  const validTo = new Date(validToSeconds * 1000);
  if (validTo.getTime() <= now) throw validationError('ValidTo must be in the future.');
  if (validTo.getTime() > now + 365 * DAY_MS) throw validationError('ValidTo must be at most 365 days from now.');
  return { expirationModel, validTo };
}

/** Limit/Marker pagination; the marker is the index of the next item. */
function paginate<T>(items: T[], input: Input, maxLimit: number, defaultLimit: number) {
  const limit = optNumber(input, 'Limit') ?? defaultLimit;
  if (!Number.isInteger(limit) || limit < 1 || limit > maxLimit) {
    throw validationError(`Limit must be an integer between 1 and ${maxLimit}.`);
  }
  const marker = optString(input, 'Marker');
  const start = marker === undefined ? 0 : Number(marker);
  if (!Number.isInteger(start) || start < 0 || start > items.length) {
    throw new KmsError('InvalidMarkerException', 'The marker is not valid.');
  }
  const end = start + limit;
  const truncated = end < items.length;
  return { page: items.slice(start, end), Truncated: truncated, NextMarker: truncated ? String(end) : undefined };
}

const createKey: Operation = ({ store, caller }, input) => {
  const description = optString(input, 'Description') ?? '';
  if (description.length > 8192) throw lengthError('Description', 'less than or equal to', 8192);
  const policy = optString(input, 'Policy') ?? defaultPolicy(caller.accountId);
  checkPolicy(policy);
  const keySpec = optString(input, 'KeySpec');
  const cmkSpec = optString(input, 'CustomerMasterKeySpec');
  if (keySpec !== undefined && cmkSpec !== undefined) {
    throw validationError('You cannot specify KeySpec and CustomerMasterKeySpec in the same request.');
  }
  if (keySpec !== undefined) checkEnum('KeySpec', keySpec, KeySpec, ['SYMMETRIC_DEFAULT']);
  if (cmkSpec !== undefined) checkEnum('CustomerMasterKeySpec', cmkSpec, CustomerMasterKeySpec, ['SYMMETRIC_DEFAULT']);
  const keyUsage = optString(input, 'KeyUsage') ?? 'ENCRYPT_DECRYPT';
  if (keyUsage !== 'ENCRYPT_DECRYPT') {
    throw validationError(`KeyUsage ${keyUsage} is not compatible with KeySpec SYMMETRIC_DEFAULT.`);
  }
  const origin = optString(input, 'Origin') ?? 'AWS_KMS';
  checkEnum('Origin', origin, OriginType, ['AWS_KMS', 'EXTERNAL']);
  if (input.CustomKeyStoreId !== undefined || input.XksKeyId !== undefined) {
    throw new KmsError('UnsupportedOperationException', 'Custom key stores are not supported by the KMS emulator.');
  }
  const tags = optTags(input, 'Tags') ?? [];
  checkTags(tags);
  // BypassPolicyLockoutSafetyCheck is accepted; the emulator does not know the caller's principal to run the check.
  optBoolean(input, 'BypassPolicyLockoutSafetyCheck');
  const multiRegion = optBoolean(input, 'MultiRegion') ?? false;
  const keyId = multiRegion ? `mrk-${randomBytes(16).toString('hex')}` : randomUUID();
  const external = origin === 'EXTERNAL';
  const key: Key = {
    keyId,
    arn: keyArn(caller, keyId),
    accountId: caller.accountId,
    region: caller.region,
    origin: external ? 'EXTERNAL' : 'AWS_KMS',
    keyState: external ? 'PendingImport' : 'Enabled',
    description,
    multiRegion,
    tags,
    policy,
    material: external ? undefined : randomBytes(32),
    importedMaterial: undefined,
    creationDate: new Date(),
  };
  store.scope(caller).keys.set(keyId, key);
  return { KeyMetadata: keyMetadata(key) };
};

const describeKey: Operation = ({ store, caller }, input) => ({
  KeyMetadata: keyMetadata(store.findKey(caller, reqString(input, 'KeyId'), true)),
});

const getKeyPolicy: Operation = ({ store, caller }, input) => {
  const key = store.findKey(caller, reqString(input, 'KeyId'), false);
  const policyName = optString(input, 'PolicyName') ?? 'default';
  if (policyName !== 'default') throw notFound(`No such policy: ${policyName}`);
  return { Policy: key.policy, PolicyName: policyName };
};

const listResourceTags: Operation = ({ store, caller }, input) => {
  const key = store.findKey(caller, reqString(input, 'KeyId'), false);
  const { page, ...rest } = paginate(key.tags, input, 50, 50);
  return { Tags: page, ...rest };
};

const getKeyRotationStatus: Operation = ({ store, caller }, input) => {
  const key = store.findKey(caller, reqString(input, 'KeyId'), false);
  // The emulator has no EnableKeyRotation; keys with imported material cannot be rotated automatically anyway.
  return { KeyRotationEnabled: false, KeyId: key.arn };
};

const listAliases: Operation = ({ store, caller }, input) => {
  const keyRef = optString(input, 'KeyId');
  const targetKeyId = keyRef === undefined ? undefined : store.findKey(caller, keyRef, false).keyId;
  const aliases = [...store.scope(caller).aliases.values()].filter(
    (alias) => targetKeyId === undefined || alias.targetKeyId === targetKeyId,
  );
  const { page, ...rest } = paginate(aliases, input, 100, 50);
  return {
    Aliases: page.map((alias) => ({
      AliasName: alias.name,
      AliasArn: aliasArn(caller, alias.name),
      TargetKeyId: alias.targetKeyId,
      CreationDate: epoch(alias.creationDate),
      LastUpdatedDate: epoch(alias.lastUpdatedDate),
    })),
    ...rest,
  };
};

const listKeys: Operation = ({ store, caller }, input) => {
  const { page, ...rest } = paginate([...store.scope(caller).keys.values()], input, 1000, 100);
  return { Keys: page.map((key) => ({ KeyId: key.keyId, KeyArn: key.arn })), ...rest };
};

/** DeleteAlias: removes the alias (the key stays); an unknown alias is NotFoundException. */
const deleteAlias: Operation = ({ store, caller }, input) => {
  const aliasName = reqString(input, 'AliasName');
  if (!store.scope(caller).aliases.delete(aliasName)) {
    throw new KmsError('NotFoundException', `Alias ${aliasArn(caller, aliasName)} is not found.`);
  }
  return {};
};

const createAlias: Operation = ({ store, caller }, input) => {
  const aliasName = reqString(input, 'AliasName');
  const targetKeyId = reqString(input, 'TargetKeyId');
  if (aliasName.length > 256) throw lengthError('AliasName', 'less than or equal to', 256);
  if (!aliasName.startsWith('alias/')) {
    throw validationError(
      'Alias must start with the prefix "alias/". ' +
        'Please see https://docs.aws.amazon.com/kms/latest/developerguide/kms-alias.html',
    );
  }
  if (!ALIAS_PATTERN.test(aliasName)) {
    throw validationError(
      `1 validation error detected: Value '${aliasName}' at 'aliasName' failed to satisfy constraint: ` +
        `Member must satisfy regular expression pattern: ${ALIAS_PATTERN.source}`,
    );
  }
  if (aliasName.startsWith('alias/aws/')) {
    throw new KmsError('NotAuthorizedException', "Cannot create alias with prefix 'alias/aws/'");
  }
  const aliases = store.scope(caller).aliases;
  if (aliases.has(aliasName)) {
    throw new KmsError('AlreadyExistsException', `An alias with the name ${aliasArn(caller, aliasName)} already exists`);
  }
  const key = store.findKey(caller, targetKeyId, false);
  requireState(key, ['Enabled', 'PendingImport']);
  const now = new Date();
  aliases.set(aliasName, { name: aliasName, targetKeyId: key.keyId, creationDate: now, lastUpdatedDate: now });
  return {};
};

const tagResource: Operation = ({ store, caller }, input) => {
  const key = store.findKey(caller, reqString(input, 'KeyId'), false);
  const tags = optTags(input, 'Tags');
  if (!tags) throw validationError('Tags is required.');
  checkTags(tags);
  requireState(key, ['Enabled', 'PendingImport']);
  for (const tag of tags) {
    const existing = key.tags.find((t) => t.TagKey === tag.TagKey);
    if (existing) existing.TagValue = tag.TagValue;
    else key.tags.push(tag);
  }
  return {};
};

const scheduleKeyDeletion: Operation = ({ store, caller }, input) => {
  const key = store.findKey(caller, reqString(input, 'KeyId'), false);
  const days = optNumber(input, 'PendingWindowInDays') ?? 30;
  if (!Number.isInteger(days) || days < 7 || days > 30) {
    throw validationError('PendingWindowInDays must be an integer between 7 and 30.');
  }
  requireState(key, ['Enabled', 'PendingImport']);
  key.keyState = 'PendingDeletion';
  key.deletionDate = new Date(Date.now() + days * DAY_MS);
  return { KeyId: key.arn, DeletionDate: epoch(key.deletionDate), KeyState: key.keyState, PendingWindowInDays: days };
};

const getParametersForImport: Operation = async ({ store, tokens, caller }, input) => {
  const key = store.findKey(caller, reqString(input, 'KeyId'), false);
  const algorithm = reqString(input, 'WrappingAlgorithm');
  const spec = reqString(input, 'WrappingKeySpec');
  requireExternal(key);
  requireState(key, ['Enabled', 'PendingImport']);
  const params = await tokens.issue(key.arn, algorithm, spec, Date.now());
  return {
    KeyId: key.arn,
    ImportToken: params.importToken.toString('base64'),
    PublicKey: params.publicKey.toString('base64'),
    ParametersValidTo: epoch(params.validTo),
  };
};

const importKeyMaterial: Operation = async ({ store, tokens, caller }, input) => {
  const now = Date.now();
  const key = store.findKey(caller, reqString(input, 'KeyId'), false);
  const importToken = reqBlob(input, 'ImportToken');
  const encryptedMaterial = reqBlob(input, 'EncryptedKeyMaterial');
  const { expirationModel, validTo } = expirationOf(input, now);
  requireExternal(key);
  requireState(key, ['Enabled', 'PendingImport']);
  if (optString(input, 'ImportType') === 'NEW_KEY_MATERIAL' && key.importedMaterial) {
    throw new KmsError(
      'UnsupportedOperationException',
      'Rotating imported key material is not supported by the KMS emulator.',
    );
  }
  const material = await tokens.unwrap(importToken, key.arn, encryptedMaterial, now);
  if (material.length !== 32) {
    throw new KmsError('IncorrectKeyMaterialException', 'Symmetric key material must be 256 bits (32 bytes).');
  }
  if (key.importedMaterial && !key.importedMaterial.equals(material)) {
    throw new KmsError(
      'IncorrectKeyMaterialException',
      'The key material is not the material previously imported into this KMS key.',
    );
  }
  key.importedMaterial = material;
  key.material = material;
  key.expirationModel = expirationModel;
  key.validTo = validTo;
  key.keyState = 'Enabled';
  const keyMaterialId = createHash('sha256').update(key.keyId).update(material).digest('hex');
  return { KeyId: key.arn, KeyMaterialId: keyMaterialId };
};

const encrypt: Operation = ({ store, caller }, input) => {
  const key = store.findKey(caller, reqString(input, 'KeyId'), true);
  const plaintext = reqBlob(input, 'Plaintext');
  if (plaintext.length < 1) throw lengthError('Plaintext', 'greater than or equal to', 1);
  if (plaintext.length > 4096) throw lengthError('Plaintext', 'less than or equal to', 4096);
  const context = optStringMap(input, 'EncryptionContext') ?? {};
  checkEncryptionAlgorithm(input);
  const blob = encryptWithMaterial(key.keyId, usableMaterial(key), plaintext, context);
  return { KeyId: key.arn, CiphertextBlob: blob.toString('base64'), EncryptionAlgorithm: 'SYMMETRIC_DEFAULT' };
};

const decrypt: Operation = ({ store, caller }, input) => {
  const blob = reqBlob(input, 'CiphertextBlob');
  const context = optStringMap(input, 'EncryptionContext') ?? {};
  checkEncryptionAlgorithm(input);
  const keyRef = optString(input, 'KeyId');
  const requestedKey = keyRef === undefined ? undefined : store.findKey(caller, keyRef, true);
  const parsed = parseCiphertext(blob);
  if (!parsed) throw new KmsError('InvalidCiphertextException', 'The ciphertext is not valid.');
  let key: Key;
  try {
    key = store.findKey(caller, parsed.keyId, false);
  } catch {
    throw new KmsError(
      'AccessDeniedException',
      'The ciphertext refers to a customer master key that does not exist, does not exist in this region, ' +
        'or you are not allowed to access.',
    );
  }
  if (requestedKey && requestedKey !== key) {
    throw new KmsError(
      'IncorrectKeyException',
      'The key ID in the request does not identify the KMS key that encrypted the ciphertext.',
    );
  }
  const material = usableMaterial(key);
  let plaintext: Buffer;
  try {
    plaintext = decryptParsed(parsed, material, context);
  } catch {
    throw new KmsError('InvalidCiphertextException', 'The ciphertext or its encryption context is not valid.');
  }
  return { KeyId: key.arn, Plaintext: plaintext.toString('base64'), EncryptionAlgorithm: 'SYMMETRIC_DEFAULT' };
};

/** The supported TrentService operations, by name. */
export const operations = new Map<string, Operation>([
  ['CreateKey', createKey],
  ['DescribeKey', describeKey],
  ['GetKeyPolicy', getKeyPolicy],
  ['ListResourceTags', listResourceTags],
  ['GetKeyRotationStatus', getKeyRotationStatus],
  ['ListAliases', listAliases],
  ['ListKeys', listKeys],
  ['CreateAlias', createAlias],
  ['DeleteAlias', deleteAlias],
  ['TagResource', tagResource],
  ['ScheduleKeyDeletion', scheduleKeyDeletion],
  ['GetParametersForImport', getParametersForImport],
  ['ImportKeyMaterial', importKeyMaterial],
  ['Encrypt', encrypt],
  ['Decrypt', decrypt],
]);
