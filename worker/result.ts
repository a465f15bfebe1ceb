import type { KeyMetadata, Tag } from '@aws-sdk/client-kms';
import type { KmsConnection } from '../shared/resources.js';
import type { SourceKey } from './sources/index.js';

export const JOB_TAG_KEY = 'keyferry:job-id';

/** AWS's timestamps as the spec's example writes them: seconds, UTC, `Z`. */
const awsTime = (d: Date | undefined) => (d ? d.toISOString().replace(/\.\d{3}Z$/, 'Z') : undefined);

export interface DescribeOutput {
  metadata: KeyMetadata;
  policy: string | undefined;
  aliases: string[];
  tags: Tag[];
  rotationEnabled: boolean;
}

/** The uploaded key in the spec's response shape (CCKM's AWS key resource). */
export function buildKeyResource(args: {
  id: string;
  account: string;
  conn: KmsConnection;
  region: string;
  source: SourceKey;
  described: DescribeOutput;
  now: string;
}) {
  const { id, account, conn, region, source, described, now } = args;
  const m = described.metadata;
  const awsParam: Record<string, unknown> = {
    AWSAccountId: m.AWSAccountId,
    Arn: m.Arn,
    CustomerMasterKeySpec: m.CustomerMasterKeySpec ?? m.KeySpec,
    Enabled: m.Enabled,
    EncryptionAlgorithms: m.EncryptionAlgorithms ?? [],
    KeyID: m.KeyId,
    KeyManager: m.KeyManager,
    KeyState: m.KeyState,
    KeyUsage: m.KeyUsage,
    Origin: m.Origin,
    CreationDate: awsTime(m.CreationDate),
    ...(m.Description ? { Description: m.Description } : {}),
    Policy: described.policy ? (JSON.parse(described.policy) as unknown) : null,
    Alias: described.aliases,
    // keyferry's own job tag is bookkeeping; the resource shows the tags the caller asked for.
    Tags: described.tags.filter((t) => t.TagKey !== JOB_TAG_KEY).map((t) => ({ TagKey: t.TagKey, TagValue: t.TagValue })),
    KeyRotationEnabled: described.rotationEnabled,
    ExpirationModel: m.ExpirationModel,
    ...(m.ValidTo ? { ValidTo: awsTime(m.ValidTo) } : {}),
    ...(m.MultiRegion ? { MultiRegion: true, MultiRegionConfiguration: m.MultiRegionConfiguration } : {}),
  };
  return {
    id,
    uri: `keyferry:${account}:cckm:aws-key:${id}`,
    account: `keyferry:${account}:admin:accounts:${account}`,
    application: `keyferry:${account}:admin:apps:keyferry`,
    devAccount: `keyferry:${account}:admin:accounts:${account}`,
    createdAt: now,
    updatedAt: now,
    kms_id: conn.id,
    kms: conn.name,
    synced_at: now,
    rotation_status: '',
    local_key_id: source.id,
    local_key_name: source.name,
    cloud_name: 'aws',
    key_type: 'symmetric',
    basic_view_enabled: false,
    region,
    gone: false,
    key_material_origin: source.origin,
    aws_param: awsParam,
  };
}
