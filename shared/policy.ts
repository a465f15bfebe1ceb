import type { UploadKeyRequest } from './schemas/upload-key.js';

interface Statement {
  Sid: string;
  Effect: 'Allow';
  Principal: { AWS: string | string[] };
  Action: string | string[];
  Resource: '*';
  Condition?: Record<string, Record<string, boolean>>;
}

const ADMIN_ACTIONS = [
  'kms:Create*',
  'kms:Describe*',
  'kms:Enable*',
  'kms:List*',
  'kms:Put*',
  'kms:Update*',
  'kms:Revoke*',
  'kms:Disable*',
  'kms:Get*',
  'kms:Delete*',
  'kms:TagResource',
  'kms:UntagResource',
  'kms:ScheduleKeyDeletion',
  'kms:CancelKeyDeletion',
  'kms:ImportKeyMaterial',
  'kms:DeleteImportedKeyMaterial',
];
const USER_ACTIONS = ['kms:Encrypt', 'kms:Decrypt', 'kms:ReEncrypt*', 'kms:GenerateDataKey*', 'kms:DescribeKey'];
const GRANT_ACTIONS = ['kms:CreateGrant', 'kms:ListGrants', 'kms:RevokeGrant'];

/** The ARN partition of a region: aws, aws-cn, aws-us-gov, aws-iso, aws-iso-b. */
export function partitionOf(region: string): string {
  if (region.startsWith('cn-')) return 'aws-cn';
  if (region.startsWith('us-gov-')) return 'aws-us-gov';
  if (region.startsWith('us-isob-')) return 'aws-iso-b';
  if (region.startsWith('us-iso-')) return 'aws-iso';
  return 'aws';
}

/** One principal alone is a string, as the AWS console writes it. */
const principal = (arns: string[]) => ({ AWS: arns.length === 1 ? (arns[0] as string) : arns });

/**
 * The key policy for a request, as the AWS console and CCKM build it:
 * - `aws_param.Policy` as given;
 * - the template's policy when `policytemplate` is given (passed in resolved);
 * - from the principal lists for account `accountId`;
 * - undefined otherwise: send none and AWS applies its default policy.
 */
export function buildKeyPolicy(req: UploadKeyRequest, accountId: string, templatePolicy?: string): string | undefined {
  if (req.aws_param.Policy !== undefined) return req.aws_param.Policy;
  if (templatePolicy !== undefined) return templatePolicy;

  const partition = partitionOf(req.region);
  const iam = (account: string, rest: string) => `arn:${partition}:iam::${account}:${rest}`;
  const arnOr = (kind: 'user' | 'role', name: string) => (name.startsWith('arn:') ? name : iam(accountId, `${kind}/${name}`));
  const admins = [...(req.key_admins ?? []).map((n) => arnOr('user', n)), ...(req.key_admins_roles ?? []).map((n) => arnOr('role', n))];
  const users = [
    ...(req.key_users ?? []).map((n) => arnOr('user', n)),
    ...(req.key_users_roles ?? []).map((n) => arnOr('role', n)),
    ...(req.external_accounts ?? []).map((a) => iam(a, 'root')),
  ];
  if (admins.length === 0 && users.length === 0) return undefined;

  const statements: Statement[] = [
    {
      Sid: 'Enable IAM User Permissions',
      Effect: 'Allow',
      Principal: { AWS: iam(accountId, 'root') },
      Action: 'kms:*',
      Resource: '*',
    },
  ];
  if (admins.length > 0) {
    statements.push({ Sid: 'Allow access for Key Administrators', Effect: 'Allow', Principal: principal(admins), Action: ADMIN_ACTIONS, Resource: '*' });
  }
  if (users.length > 0) {
    statements.push({ Sid: 'Allow use of the key', Effect: 'Allow', Principal: principal(users), Action: USER_ACTIONS, Resource: '*' });
    statements.push({
      Sid: 'Allow attachment of persistent resources',
      Effect: 'Allow',
      Principal: principal(users),
      Action: GRANT_ACTIONS,
      Resource: '*',
      Condition: { Bool: { 'kms:GrantIsForAWSResource': true } },
    });
  }
  return JSON.stringify({ Version: '2012-10-17', Id: 'key-consolepolicy-3', Statement: statements });
}
