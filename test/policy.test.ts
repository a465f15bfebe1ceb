import { describe, expect, it } from 'vitest';
import { buildKeyPolicy } from '../shared/policy.js';
import { parseUploadKey } from '../shared/schemas/upload-key.js';

const base = { source_key_identifier: 'k', region: 'ap-south-1', kms: 'kms' };
const policyOf = (extra: Record<string, unknown>, template?: string) => {
  const p = buildKeyPolicy(parseUploadKey({ ...base, ...extra }), '123456789012', template);
  return p === undefined ? undefined : (JSON.parse(p) as { Statement: { Sid: string; Principal: { AWS: string | string[] }; Action: string | string[]; Condition?: unknown }[] });
};

describe('key policy from the request', () => {
  it('when nothing is given, then no policy is sent (AWS applies its default)', () => {
    expect(policyOf({})).toBeUndefined();
  });

  it('when Policy is given, then it is used unchanged', () => {
    const policy = '{"Version":"2012-10-17","Statement":[]}';
    expect(buildKeyPolicy(parseUploadKey({ ...base, aws_param: { Policy: policy } }), '123456789012')).toBe(policy);
  });

  it('when a template policy is resolved, then it is used', () => {
    expect(buildKeyPolicy(parseUploadKey({ ...base, policytemplate: 't' }), '123456789012', '{"Id":"tpl"}')).toBe('{"Id":"tpl"}');
  });

  it('when admins, users, roles and external accounts are given, then the console-style statements name them', () => {
    const p = policyOf({
      key_admins: ['alice'],
      key_admins_roles: ['arn:aws:iam::123456789012:role/Ops'],
      key_users: ['bob'],
      key_users_roles: ['app'],
      external_accounts: ['444455556666'],
    });
    const bySid = Object.fromEntries((p?.Statement ?? []).map((s) => [s.Sid, s]));
    expect(bySid['Enable IAM User Permissions']?.Principal.AWS).toBe('arn:aws:iam::123456789012:root');
    expect(bySid['Allow access for Key Administrators']?.Principal.AWS).toEqual([
      'arn:aws:iam::123456789012:user/alice',
      'arn:aws:iam::123456789012:role/Ops',
    ]);
    expect(bySid['Allow access for Key Administrators']?.Action).toContain('kms:ImportKeyMaterial');
    expect(bySid['Allow use of the key']?.Principal.AWS).toEqual([
      'arn:aws:iam::123456789012:user/bob',
      'arn:aws:iam::123456789012:role/app',
      'arn:aws:iam::444455556666:root',
    ]);
    expect(bySid['Allow attachment of persistent resources']?.Condition).toEqual({ Bool: { 'kms:GrantIsForAWSResource': true } });
  });

  it('when the region is in another partition, then the ARNs use it', () => {
    const p = buildKeyPolicy(parseUploadKey({ ...base, region: 'cn-north-1', key_users: ['bob'] }), '123456789012');
    expect(p).toContain('arn:aws-cn:iam::123456789012:root');
    expect(p).toContain('arn:aws-cn:iam::123456789012:user/bob');
    expect(p).not.toContain('arn:aws:iam');
  });

  it('when only users are given, then there is no administrators statement', () => {
    const sids = policyOf({ key_users: ['bob'] })?.Statement.map((s) => s.Sid);
    expect(sids).toEqual(['Enable IAM User Permissions', 'Allow use of the key', 'Allow attachment of persistent resources']);
  });
});
