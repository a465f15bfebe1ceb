import {
  CreateAliasCommand,
  CreateKeyCommand,
  DecryptCommand,
  DescribeKeyCommand,
  EncryptCommand,
  GetKeyPolicyCommand,
  GetKeyRotationStatusCommand,
  GetParametersForImportCommand,
  ImportKeyMaterialCommand,
  KMSClient,
  ListAliasesCommand,
  ListKeysCommand,
  ListResourceTagsCommand,
  ScheduleKeyDeletionCommand,
  TagResourceCommand,
  type AlgorithmSpec,
  type ExpirationModelType,
  type GetParametersForImportResponse,
  type WrappingKeySpec,
} from '@aws-sdk/client-kms';
import { constants, createPublicKey, publicEncrypt, randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { decryptEmulatorCiphertext, KmsEmulator } from './kms-emulator/emulator.js';

const REGION = 'us-east-1';
const ACCOUNT = '123456789012';
const OTHER_ACCOUNT = '210987654321';
const UNKNOWN_KEY_ID = '11111111-2222-4333-8444-555555555555';

function kmsClient(url: string, region = REGION, accessKeyId = 'AKIDTEST'): KMSClient {
  return new KMSClient({
    region,
    endpoint: url,
    credentials: { accessKeyId, secretAccessKey: 'test' },
    maxAttempts: 1,
  });
}

/** Asserts the SDK call fails with the given error name and HTTP status. */
async function expectKmsError(call: Promise<unknown>, name: string, status = 400): Promise<void> {
  const error = await call.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(error).toMatchObject({ name, $metadata: { httpStatusCode: status } });
}

async function createExternalKey(kms: KMSClient): Promise<string> {
  const { KeyMetadata } = await kms.send(new CreateKeyCommand({ Origin: 'EXTERNAL' }));
  return KeyMetadata?.KeyId ?? '';
}

function importParameters(
  kms: KMSClient,
  keyId: string,
  WrappingKeySpec: WrappingKeySpec = 'RSA_2048',
  WrappingAlgorithm: AlgorithmSpec = 'RSAES_OAEP_SHA_256',
): Promise<GetParametersForImportResponse> {
  return kms.send(new GetParametersForImportCommand({ KeyId: keyId, WrappingAlgorithm, WrappingKeySpec }));
}

function wrap(params: GetParametersForImportResponse, material: Buffer, oaepHash = 'sha256'): Buffer {
  const key = createPublicKey({ key: Buffer.from(params.PublicKey ?? []), format: 'der', type: 'spki' });
  return publicEncrypt({ key, padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash }, material);
}

function importMaterial(
  kms: KMSClient,
  keyId: string,
  params: GetParametersForImportResponse,
  encrypted: Buffer,
  expiration: { ExpirationModel?: ExpirationModelType; ValidTo?: Date } = {
    ExpirationModel: 'KEY_MATERIAL_DOES_NOT_EXPIRE',
  },
) {
  return kms.send(
    new ImportKeyMaterialCommand({
      KeyId: keyId,
      ImportToken: params.ImportToken,
      EncryptedKeyMaterial: encrypted,
      ...expiration,
    }),
  );
}

async function encryptText(kms: KMSClient, keyId: string, text: string): Promise<Uint8Array> {
  const { CiphertextBlob } = await kms.send(new EncryptCommand({ KeyId: keyId, Plaintext: Buffer.from(text) }));
  return CiphertextBlob ?? new Uint8Array();
}

describe('KMS emulator', () => {
  const emulator = new KmsEmulator({ accounts: { AKIDOTHER: OTHER_ACCOUNT } });
  let kms: KMSClient;
  let url: string;

  beforeAll(async () => {
    url = await emulator.start();
    kms = kmsClient(url);
  });

  afterAll(async () => {
    kms.destroy();
    await emulator.close();
  });

  describe('importing key material', () => {
    it('imports wrapped material into an EXTERNAL key and encrypts with exactly that material', async () => {
      const created = await kms.send(new CreateKeyCommand({ Origin: 'EXTERNAL', Description: 'byok' }));
      const keyId = created.KeyMetadata?.KeyId ?? '';
      expect(keyId).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
      expect(created.KeyMetadata).toMatchObject({
        AWSAccountId: ACCOUNT,
        Arn: `arn:aws:kms:${REGION}:${ACCOUNT}:key/${keyId}`,
        KeyState: 'PendingImport',
        Enabled: false,
        Origin: 'EXTERNAL',
        KeyManager: 'CUSTOMER',
        KeySpec: 'SYMMETRIC_DEFAULT',
        KeyUsage: 'ENCRYPT_DECRYPT',
        EncryptionAlgorithms: ['SYMMETRIC_DEFAULT'],
        MultiRegion: false,
      });
      expect(created.KeyMetadata?.CreationDate).toBeInstanceOf(Date);

      const before = Date.now();
      const params = await importParameters(kms, keyId);
      expect(params.KeyId).toBe(created.KeyMetadata?.Arn);
      expect(params.ParametersValidTo?.getTime()).toBeGreaterThan(before + 23 * 3600_000);
      const material = randomBytes(32);
      const imported = await importMaterial(kms, keyId, params, wrap(params, material));
      expect(imported.KeyId).toBe(created.KeyMetadata?.Arn);

      const { KeyMetadata } = await kms.send(new DescribeKeyCommand({ KeyId: keyId }));
      expect(KeyMetadata).toMatchObject({
        KeyState: 'Enabled',
        Enabled: true,
        ExpirationModel: 'KEY_MATERIAL_DOES_NOT_EXPIRE',
      });
      expect(KeyMetadata?.ValidTo).toBeUndefined();

      const encrypted = await kms.send(new EncryptCommand({ KeyId: keyId, Plaintext: Buffer.from('hello kms') }));
      expect(encrypted).toMatchObject({ KeyId: created.KeyMetadata?.Arn, EncryptionAlgorithm: 'SYMMETRIC_DEFAULT' });
      const blob = Buffer.from(encrypted.CiphertextBlob ?? []);
      const decrypted = await kms.send(new DecryptCommand({ CiphertextBlob: blob }));
      expect(Buffer.from(decrypted.Plaintext ?? []).toString()).toBe('hello kms');
      expect(decrypted.KeyId).toBe(created.KeyMetadata?.Arn);
      expect(decryptEmulatorCiphertext(blob, material).toString()).toBe('hello kms');
      expect(() => decryptEmulatorCiphertext(blob, randomBytes(32))).toThrow();
      expect(emulator.keys().find((k) => k.keyId === keyId)?.material?.equals(material)).toBe(true);
    });

    it('unwraps with RSA_4096 and RSAES_OAEP_SHA_1', async () => {
      const keyId = await createExternalKey(kms);
      const params = await importParameters(kms, keyId, 'RSA_4096', 'RSAES_OAEP_SHA_1');
      const material = randomBytes(32);
      await importMaterial(kms, keyId, params, wrap(params, material, 'sha1'));
      const blob = await encryptText(kms, keyId, 'four thousand');
      expect(decryptEmulatorCiphertext(Buffer.from(blob), material).toString()).toBe('four thousand');
    });

    it('accepts reimport of the same material and rejects different or malformed material', async () => {
      const keyId = await createExternalKey(kms);
      const material = randomBytes(32);
      const first = await importParameters(kms, keyId);
      await importMaterial(kms, keyId, first, wrap(first, material));

      const again = await importParameters(kms, keyId);
      await importMaterial(kms, keyId, again, wrap(again, material));
      await expectKmsError(
        importMaterial(kms, keyId, again, wrap(again, randomBytes(32))),
        'IncorrectKeyMaterialException',
      );
      await expectKmsError(
        importMaterial(kms, keyId, again, wrap(again, randomBytes(16))),
        'IncorrectKeyMaterialException',
      );
      expect(emulator.keys().find((k) => k.keyId === keyId)?.material?.equals(material)).toBe(true);
    });

    it('rejects a token issued for another key, a forged token and an expired token', async () => {
      const keyA = await createExternalKey(kms);
      const keyB = await createExternalKey(kms);
      const paramsA = await importParameters(kms, keyA);
      const material = wrap(paramsA, randomBytes(32));
      await expectKmsError(importMaterial(kms, keyB, paramsA, material), 'InvalidImportTokenException');
      await expectKmsError(
        importMaterial(kms, keyA, { ...paramsA, ImportToken: randomBytes(256) }, material),
        'InvalidImportTokenException',
      );

      const shortLived = new KmsEmulator({ importTokenTtlMs: 1 });
      const shortKms = kmsClient(await shortLived.start());
      try {
        const keyId = await createExternalKey(shortKms);
        const params = await importParameters(shortKms, keyId);
        await sleep(20);
        await expectKmsError(
          importMaterial(shortKms, keyId, params, wrap(params, randomBytes(32))),
          'ExpiredImportTokenException',
        );
      } finally {
        shortKms.destroy();
        await shortLived.close();
      }
    });

    it('rejects material wrapped with another algorithm than the token was issued for', async () => {
      const keyId = await createExternalKey(kms);
      const params = await importParameters(kms, keyId, 'RSA_2048', 'RSAES_OAEP_SHA_256');
      await expectKmsError(
        importMaterial(kms, keyId, params, wrap(params, randomBytes(32), 'sha1')),
        'InvalidCiphertextException',
      );
      await expectKmsError(importMaterial(kms, keyId, params, randomBytes(256)), 'InvalidCiphertextException');
    });

    it('enforces the ExpirationModel and ValidTo rules and expires the material at ValidTo', async () => {
      const keyId = await createExternalKey(kms);
      const params = await importParameters(kms, keyId);
      const material = randomBytes(32);
      const encrypted = wrap(params, material);
      const inDays = (days: number) => new Date(Date.now() + days * 86_400_000);

      await expectKmsError(importMaterial(kms, keyId, params, encrypted, {}), 'ValidationException');
      await expectKmsError(
        importMaterial(kms, keyId, params, encrypted, { ExpirationModel: 'KEY_MATERIAL_EXPIRES' }),
        'ValidationException',
      );
      await expectKmsError(
        importMaterial(kms, keyId, params, encrypted, {
          ExpirationModel: 'KEY_MATERIAL_DOES_NOT_EXPIRE',
          ValidTo: inDays(10),
        }),
        'ValidationException',
      );
      await expectKmsError(importMaterial(kms, keyId, params, encrypted, { ValidTo: inDays(-1) }), 'ValidationException');
      await expectKmsError(importMaterial(kms, keyId, params, encrypted, { ValidTo: inDays(366) }), 'ValidationException');

      const validTo = inDays(365 - 1);
      await importMaterial(kms, keyId, params, encrypted, { ValidTo: validTo });
      const { KeyMetadata } = await kms.send(new DescribeKeyCommand({ KeyId: keyId }));
      expect(KeyMetadata).toMatchObject({ KeyState: 'Enabled', ExpirationModel: 'KEY_MATERIAL_EXPIRES' });
      expect(KeyMetadata?.ValidTo?.getTime()).toBe(validTo.getTime());

      const soon = new Date(Date.now() + 1000);
      await importMaterial(kms, keyId, params, encrypted, { ValidTo: soon });
      await encryptText(kms, keyId, 'still valid');
      await sleep(soon.getTime() - Date.now() + 50);
      const expired = await kms.send(new DescribeKeyCommand({ KeyId: keyId }));
      expect(expired.KeyMetadata).toMatchObject({ KeyState: 'PendingImport', Enabled: false });
      await expectKmsError(encryptText(kms, keyId, 'too late'), 'KMSInvalidStateException');
      await importMaterial(kms, keyId, params, encrypted);
      await encryptText(kms, keyId, 'reimported');
    });

    it('refuses import operations on AWS_KMS keys and on keys pending deletion', async () => {
      const { KeyMetadata } = await kms.send(new CreateKeyCommand({}));
      expect(KeyMetadata).toMatchObject({ KeyState: 'Enabled', Enabled: true, Origin: 'AWS_KMS' });
      expect(KeyMetadata?.ExpirationModel).toBeUndefined();
      await expectKmsError(importParameters(kms, KeyMetadata?.KeyId ?? ''), 'UnsupportedOperationException');

      const keyId = await createExternalKey(kms);
      const params = await importParameters(kms, keyId);
      await kms.send(new ScheduleKeyDeletionCommand({ KeyId: keyId, PendingWindowInDays: 7 }));
      await expectKmsError(importMaterial(kms, keyId, params, wrap(params, randomBytes(32))), 'KMSInvalidStateException');
      await expectKmsError(importParameters(kms, keyId), 'KMSInvalidStateException');
    });

    it('reports rotation disabled for EXTERNAL keys', async () => {
      const keyId = await createExternalKey(kms);
      const status = await kms.send(new GetKeyRotationStatusCommand({ KeyId: keyId }));
      expect(status.KeyRotationEnabled).toBe(false);
    });
  });

  describe('keys', () => {
    it('gives a key without Policy the AWS default key policy', async () => {
      const keyId = await createExternalKey(kms);
      const { Policy, PolicyName } = await kms.send(new GetKeyPolicyCommand({ KeyId: keyId, PolicyName: 'default' }));
      expect(PolicyName).toBe('default');
      expect(JSON.parse(Policy ?? '')).toEqual({
        Version: '2012-10-17',
        Id: 'key-default-1',
        Statement: [
          {
            Sid: 'Enable IAM User Permissions',
            Effect: 'Allow',
            Principal: { AWS: `arn:aws:iam::${ACCOUNT}:root` },
            Action: 'kms:*',
            Resource: '*',
          },
        ],
      });
    });

    it('validates CreateKey parameters', async () => {
      const policy = JSON.stringify({ Version: '2012-10-17', Statement: [] });
      const { KeyMetadata } = await kms.send(new CreateKeyCommand({ Policy: policy }));
      const stored = await kms.send(new GetKeyPolicyCommand({ KeyId: KeyMetadata?.Arn }));
      expect(stored.Policy).toBe(policy);

      await expectKmsError(kms.send(new CreateKeyCommand({ Policy: '{not json' })), 'MalformedPolicyDocumentException');
      await expectKmsError(kms.send(new CreateKeyCommand({ KeySpec: 'RSA_2048' })), 'UnsupportedOperationException');
      await expectKmsError(kms.send(new CreateKeyCommand({ Description: 'x'.repeat(8193) })), 'ValidationException');
      await expectKmsError(
        kms.send(new CreateKeyCommand({ Tags: [{ TagKey: 'aws:owner', TagValue: 'me' }] })),
        'TagException',
      );
      await expectKmsError(
        kms.send(
          new CreateKeyCommand({
            Tags: [
              { TagKey: 'team', TagValue: 'a' },
              { TagKey: 'team', TagValue: 'b' },
            ],
          }),
        ),
        'TagException',
      );
      await expectKmsError(
        kms.send(new CreateKeyCommand({ Tags: [{ TagKey: 'k'.repeat(129), TagValue: '' }] })),
        'ValidationException',
      );
      const tags = (n: number) => Array.from({ length: n }, (_, i) => ({ TagKey: `k${i}`, TagValue: 'v' }));
      await expectKmsError(kms.send(new CreateKeyCommand({ Tags: tags(51) })), 'TagException');
      expect((await kms.send(new CreateKeyCommand({ Tags: tags(50) }))).KeyMetadata?.KeyId).toEqual(expect.any(String));
    });

    it('creates multi-Region keys with an mrk- key id', async () => {
      const { KeyMetadata } = await kms.send(new CreateKeyCommand({ MultiRegion: true, Origin: 'EXTERNAL' }));
      expect(KeyMetadata?.KeyId).toMatch(/^mrk-[0-9a-f]{32}$/);
      expect(KeyMetadata).toMatchObject({
        MultiRegion: true,
        MultiRegionConfiguration: {
          MultiRegionKeyType: 'PRIMARY',
          PrimaryKey: { Arn: KeyMetadata?.Arn, Region: REGION },
          ReplicaKeys: [],
        },
      });
    });

    it('tags keys', async () => {
      const { KeyMetadata } = await kms.send(
        new CreateKeyCommand({ Tags: [{ TagKey: 'team', TagValue: 'crypto' }] }),
      );
      const keyId = KeyMetadata?.KeyId ?? '';
      await kms.send(
        new TagResourceCommand({
          KeyId: keyId,
          Tags: [
            { TagKey: 'team', TagValue: 'platform' },
            { TagKey: 'env', TagValue: 'test' },
          ],
        }),
      );
      const { Tags } = await kms.send(new ListResourceTagsCommand({ KeyId: keyId }));
      expect(Tags).toEqual([
        { TagKey: 'team', TagValue: 'platform' },
        { TagKey: 'env', TagValue: 'test' },
      ]);
    });

    it('raises NotFoundException for unknown keys', async () => {
      await expectKmsError(kms.send(new DescribeKeyCommand({ KeyId: UNKNOWN_KEY_ID })), 'NotFoundException');
      await expectKmsError(
        encryptText(kms, `arn:aws:kms:${REGION}:${ACCOUNT}:key/${UNKNOWN_KEY_ID}`, 'x'),
        'NotFoundException',
      );
      await expectKmsError(kms.send(new DescribeKeyCommand({ KeyId: 'alias/missing' })), 'NotFoundException');
    });

    it('schedules key deletion', async () => {
      const { KeyMetadata } = await kms.send(new CreateKeyCommand({}));
      const keyId = KeyMetadata?.KeyId ?? '';
      await expectKmsError(
        kms.send(new ScheduleKeyDeletionCommand({ KeyId: keyId, PendingWindowInDays: 6 })),
        'ValidationException',
      );
      const before = Date.now();
      const scheduled = await kms.send(new ScheduleKeyDeletionCommand({ KeyId: keyId }));
      expect(scheduled).toMatchObject({ KeyId: KeyMetadata?.Arn, KeyState: 'PendingDeletion', PendingWindowInDays: 30 });
      expect(scheduled.DeletionDate?.getTime()).toBeGreaterThanOrEqual(before + 30 * 86_400_000 - 1000);

      const described = await kms.send(new DescribeKeyCommand({ KeyId: keyId }));
      expect(described.KeyMetadata).toMatchObject({ KeyState: 'PendingDeletion', Enabled: false });
      expect(described.KeyMetadata?.DeletionDate).toEqual(scheduled.DeletionDate);
      await expectKmsError(kms.send(new ScheduleKeyDeletionCommand({ KeyId: keyId })), 'KMSInvalidStateException');
      await expectKmsError(encryptText(kms, keyId, 'x'), 'KMSInvalidStateException');
    });

    it('pages ListKeys with Limit and Marker', async () => {
      const tokyo = kmsClient(url, 'ap-northeast-1');
      try {
        const first = await tokyo.send(new CreateKeyCommand({}));
        const second = await tokyo.send(new CreateKeyCommand({}));
        const page1 = await tokyo.send(new ListKeysCommand({ Limit: 1 }));
        expect(page1).toMatchObject({ Keys: [{ KeyId: first.KeyMetadata?.KeyId }], Truncated: true });
        const page2 = await tokyo.send(new ListKeysCommand({ Limit: 1, Marker: page1.NextMarker }));
        expect(page2).toMatchObject({ Keys: [{ KeyId: second.KeyMetadata?.KeyId }], Truncated: false });
        expect(page2.NextMarker).toBeUndefined();
        await expectKmsError(tokyo.send(new ListKeysCommand({ Marker: 'bogus' })), 'InvalidMarkerException');
      } finally {
        tokyo.destroy();
      }
    });

    it('scopes keys by the account mapped from the access key id', async () => {
      const other = kmsClient(url, REGION, 'AKIDOTHER');
      try {
        const { KeyMetadata } = await other.send(new CreateKeyCommand({}));
        expect(KeyMetadata?.AWSAccountId).toBe(OTHER_ACCOUNT);
        expect(KeyMetadata?.Arn).toBe(`arn:aws:kms:${REGION}:${OTHER_ACCOUNT}:key/${KeyMetadata?.KeyId}`);
        const { Policy } = await other.send(new GetKeyPolicyCommand({ KeyId: KeyMetadata?.KeyId }));
        expect(Policy).toContain(`arn:aws:iam::${OTHER_ACCOUNT}:root`);
        await expectKmsError(kms.send(new DescribeKeyCommand({ KeyId: KeyMetadata?.KeyId })), 'NotFoundException');
        const { Keys } = await other.send(new ListKeysCommand({}));
        expect(Keys).toEqual([{ KeyId: KeyMetadata?.KeyId, KeyArn: KeyMetadata?.Arn }]);
        expect(emulator.keys().find((k) => k.keyId === KeyMetadata?.KeyId)?.accountId).toBe(OTHER_ACCOUNT);
      } finally {
        other.destroy();
      }
    });
  });

  describe('aliases', () => {
    it('keeps alias names unique per account and region and resolves them', async () => {
      const first = await kms.send(new CreateKeyCommand({}));
      const second = await kms.send(new CreateKeyCommand({}));
      const firstId = first.KeyMetadata?.KeyId ?? '';
      await kms.send(new CreateAliasCommand({ AliasName: 'alias/app/data', TargetKeyId: firstId }));
      await expectKmsError(
        kms.send(new CreateAliasCommand({ AliasName: 'alias/app/data', TargetKeyId: second.KeyMetadata?.KeyId })),
        'AlreadyExistsException',
      );

      const aliasArn = `arn:aws:kms:${REGION}:${ACCOUNT}:alias/app/data`;
      const { Aliases } = await kms.send(new ListAliasesCommand({ KeyId: firstId }));
      expect(Aliases).toEqual([
        expect.objectContaining({ AliasName: 'alias/app/data', AliasArn: aliasArn, TargetKeyId: firstId }),
      ]);
      expect(emulator.keys().find((k) => k.keyId === firstId)?.aliases).toEqual(['alias/app/data']);
      const byAliasArn = await kms.send(new DescribeKeyCommand({ KeyId: aliasArn }));
      expect(byAliasArn.KeyMetadata?.KeyId).toBe(firstId);
      const blob = await encryptText(kms, 'alias/app/data', 'via alias');
      const decrypted = await kms.send(new DecryptCommand({ CiphertextBlob: blob, KeyId: 'alias/app/data' }));
      expect(Buffer.from(decrypted.Plaintext ?? []).toString()).toBe('via alias');

      const eu = kmsClient(url, 'eu-west-1');
      try {
        await expectKmsError(eu.send(new DescribeKeyCommand({ KeyId: firstId })), 'NotFoundException');
        await expectKmsError(eu.send(new DecryptCommand({ CiphertextBlob: blob })), 'AccessDeniedException');
        const euKey = await eu.send(new CreateKeyCommand({}));
        await eu.send(new CreateAliasCommand({ AliasName: 'alias/app/data', TargetKeyId: euKey.KeyMetadata?.KeyId }));
        const euAliases = await eu.send(new ListAliasesCommand({}));
        expect(euAliases.Aliases).toEqual([
          expect.objectContaining({
            AliasArn: `arn:aws:kms:eu-west-1:${ACCOUNT}:alias/app/data`,
            TargetKeyId: euKey.KeyMetadata?.KeyId,
          }),
        ]);
      } finally {
        eu.destroy();
      }
    });

    it('validates alias names and targets', async () => {
      const { KeyMetadata } = await kms.send(new CreateKeyCommand({}));
      const target = KeyMetadata?.KeyId;
      await expectKmsError(
        kms.send(new CreateAliasCommand({ AliasName: 'app', TargetKeyId: target })),
        'ValidationException',
      );
      await expectKmsError(
        kms.send(new CreateAliasCommand({ AliasName: 'alias/bad name', TargetKeyId: target })),
        'ValidationException',
      );
      await expectKmsError(
        kms.send(new CreateAliasCommand({ AliasName: `alias/${'a'.repeat(251)}`, TargetKeyId: target })),
        'ValidationException',
      );
      await expectKmsError(
        kms.send(new CreateAliasCommand({ AliasName: 'alias/aws/mine', TargetKeyId: target })),
        'NotAuthorizedException',
      );
      await expectKmsError(
        kms.send(new CreateAliasCommand({ AliasName: 'alias/orphan', TargetKeyId: UNKNOWN_KEY_ID })),
        'NotFoundException',
      );
    });
  });

  describe('Encrypt and Decrypt', () => {
    it('refuses to encrypt with a key pending import', async () => {
      const keyId = await createExternalKey(kms);
      await expectKmsError(encryptText(kms, keyId, 'nope'), 'KMSInvalidStateException');
    });

    it('validates plaintext size and detects tampered ciphertext and a wrong encryption context', async () => {
      const { KeyMetadata } = await kms.send(new CreateKeyCommand({}));
      const keyId = KeyMetadata?.KeyId ?? '';
      await expectKmsError(
        kms.send(new EncryptCommand({ KeyId: keyId, Plaintext: new Uint8Array() })),
        'ValidationException',
      );
      await expectKmsError(
        kms.send(new EncryptCommand({ KeyId: keyId, Plaintext: randomBytes(4097) })),
        'ValidationException',
      );

      const context = { purpose: 'test' };
      const { CiphertextBlob } = await kms.send(
        new EncryptCommand({ KeyId: keyId, Plaintext: randomBytes(4096), EncryptionContext: context }),
      );
      const blob = Buffer.from(CiphertextBlob ?? []);
      await kms.send(new DecryptCommand({ CiphertextBlob: blob, EncryptionContext: context }));
      await expectKmsError(kms.send(new DecryptCommand({ CiphertextBlob: blob })), 'InvalidCiphertextException');
      const tampered = Buffer.from(blob);
      tampered[tampered.length - 20] = (tampered[tampered.length - 20] ?? 0) ^ 1;
      await expectKmsError(
        kms.send(new DecryptCommand({ CiphertextBlob: tampered, EncryptionContext: context })),
        'InvalidCiphertextException',
      );
      await expectKmsError(kms.send(new DecryptCommand({ CiphertextBlob: randomBytes(8) })), 'InvalidCiphertextException');

      const other = await kms.send(new CreateKeyCommand({}));
      await expectKmsError(
        kms.send(new DecryptCommand({ CiphertextBlob: blob, EncryptionContext: context, KeyId: other.KeyMetadata?.KeyId })),
        'IncorrectKeyException',
      );
    });
  });

  describe('faults, quotas and protocol', () => {
    it('injects faults with their AWS status codes', async () => {
      const keyId = await createExternalKey(kms);
      emulator.injectFault({ op: 'DescribeKey', error: 'KMSInternalException', count: 1 });
      await expectKmsError(kms.send(new DescribeKeyCommand({ KeyId: keyId })), 'KMSInternalException', 500);
      await kms.send(new DescribeKeyCommand({ KeyId: keyId }));

      emulator.injectFault({ op: '*', error: 'DependencyTimeoutException', count: 2 });
      await expectKmsError(kms.send(new ListKeysCommand({})), 'DependencyTimeoutException', 503);
      await expectKmsError(kms.send(new DescribeKeyCommand({ KeyId: keyId })), 'DependencyTimeoutException', 503);
      await kms.send(new ListKeysCommand({}));

      emulator.injectFault({ op: 'ListKeys', error: 'AccessDeniedException', rate: 1 });
      await expectKmsError(kms.send(new ListKeysCommand({})), 'AccessDeniedException');
      emulator.clearFaults();
      await kms.send(new ListKeysCommand({}));
    });

    it('throttles an operation above its quota per account and region', async () => {
      const throttledBefore = emulator.throttledCount('ListAliases');
      const callsBefore = emulator.callCount('ListAliases');
      emulator.setQuota('ListAliases', 2);
      try {
        const results = await Promise.allSettled(
          Array.from({ length: 5 }, () => kms.send(new ListAliasesCommand({}))),
        );
        const rejected = results.filter((r) => r.status === 'rejected');
        expect(results.filter((r) => r.status === 'fulfilled').length).toBeGreaterThanOrEqual(2);
        expect(rejected.length).toBeGreaterThanOrEqual(2);
        for (const result of rejected) {
          expect(result.reason).toMatchObject({ name: 'ThrottlingException', $metadata: { httpStatusCode: 400 } });
        }
        expect(emulator.throttledCount('ListAliases') - throttledBefore).toBe(rejected.length);
        expect(emulator.callCount('ListAliases') - callsBefore).toBe(5);

        const eu = kmsClient(url, 'eu-west-1');
        await eu.send(new ListAliasesCommand({})).finally(() => eu.destroy());
      } finally {
        emulator.setQuota('ListAliases', undefined);
      }
      await kms.send(new ListAliasesCommand({}));
    });

    it('records every request with its operation, caller and arrival time when asked to', async () => {
      const recording = new KmsEmulator({ accounts: { AKIDOTHER: OTHER_ACCOUNT }, recordRequests: true });
      const before = Date.now();
      const other = kmsClient(await recording.start(), 'eu-west-1', 'AKIDOTHER');
      try {
        await other.send(new ListKeysCommand({}));
        const [request] = recording.requests();
        expect(request).toEqual({ op: 'ListKeys', accountId: OTHER_ACCOUNT, region: 'eu-west-1', at: expect.any(Number) });
        expect(request?.at).toBeGreaterThanOrEqual(before);
        expect(emulator.requests()).toEqual([]);
      } finally {
        other.destroy();
        await recording.close();
      }
    });

    it('answers protocol errors like AWS', async () => {
      const post = (target: string, body: string, authorization?: string) =>
        fetch(url, {
          method: 'POST',
          headers: {
            'content-type': 'application/x-amz-json-1.1',
            'x-amz-target': target,
            ...(authorization && { authorization }),
          },
          body,
        });
      const auth =
        'AWS4-HMAC-SHA256 Credential=AKIDTEST/20240101/us-east-1/kms/aws4_request, SignedHeaders=host, Signature=00';

      const unknown = await post('TrentService.Frobnicate', '{}', auth);
      expect(unknown.status).toBe(400);
      expect(unknown.headers.get('x-amzn-errortype')).toBe('UnknownOperationException');
      expect(await unknown.json()).toMatchObject({ __type: 'UnknownOperationException' });

      const malformed = await post('TrentService.ListKeys', '{"Limit":', auth);
      expect(malformed.status).toBe(400);
      expect(await malformed.json()).toMatchObject({ __type: 'SerializationException' });

      const anonymous = await post('TrentService.ListKeys', '{}');
      expect(await anonymous.json()).toMatchObject({ __type: 'MissingAuthenticationTokenException' });
    });
  });
});
