import { describe, expect, it } from 'vitest';
import { readFileSync } from 'node:fs';
import { ValidationError } from '../shared/errors.js';
import { parseUploadKey, RESERVED_TAG_PREFIX } from '../shared/schemas/upload-key.js';
import { JOB_TAG_KEY } from '../worker/result.js';

const example = JSON.parse(readFileSync(new URL('./fixtures/spec-example-request.json', import.meta.url), 'utf8')) as Record<string, unknown>;
const NOW = Date.parse('2026-11-28T12:00:00Z');
const inDays = (d: number) => new Date(NOW + d * 86_400_000).toISOString();

function buildBody(overrides: Record<string, unknown> = {}, awsParam: Record<string, unknown> = {}) {
  return { ...example, ...overrides, aws_param: { ...(example.aws_param as object), ...awsParam } };
}

/** The field paths a body is rejected for (empty when it is accepted). */
function errorPaths(body: unknown): string[] {
  try {
    parseUploadKey(body, NOW);
    return [];
  } catch (err) {
    if (!(err instanceof ValidationError)) throw err;
    return (err.errors ?? []).map((e) => e.path);
  }
}

describe('upload-key request validation', () => {
  it('when the body is the spec example, then it is accepted with defaults filled in', () => {
    const req = parseUploadKey(example, NOW);
    expect(req.source_key_tier).toBe('local');
    expect(req.KeyExpiration).toBe(false);
    expect(req.aws_param.Alias).toBe('test-upload-key-1');
    expect(req.aws_param.Tags).toEqual([{ TagKey: 'key', TagValue: 'value' }]);
  });

  it.each([
    ['source_key_identifier missing', { source_key_identifier: undefined }, {}, 'source_key_identifier'],
    ['region missing', { region: undefined }, {}, 'region'],
    ['kms missing', { kms: undefined }, {}, 'kms'],
    ['region malformed', { region: 'Mumbai' }, {}, 'region'],
    ['unknown tier', { source_key_tier: 'cloud' }, {}, 'source_key_tier'],
    ['KeyExpiration not boolean', { KeyExpiration: 'yes' }, {}, 'KeyExpiration'],
    ['unknown top-level field', { colour: 'red' }, {}, 'colour'],
    ['unknown aws_param field', {}, { KeySpec: 'RSA_2048' }, 'aws_param.KeySpec'],
    ['tag value with a space', {}, { Tags: [{ TagKey: 'k', TagValue: 'two words' }] }, 'aws_param.Tags[0].TagValue'],
    ['tag value with #', {}, { Tags: [{ TagKey: 'k', TagValue: 'a#b' }] }, 'aws_param.Tags[0].TagValue'],
    ['tag key with aws: prefix', {}, { Tags: [{ TagKey: 'aws:x', TagValue: 'v' }] }, 'aws_param.Tags[0].TagKey'],
    ['tag key with the keyferry: prefix keyferry tags its keys with', {}, { Tags: [{ TagKey: 'KeyFerry:job-id', TagValue: 'v' }] }, 'aws_param.Tags[0].TagKey'],
    ['50 tags (AWS allows 50 on a key, and keyferry adds one)', {}, { Tags: Array.from({ length: 50 }, (_, i) => ({ TagKey: `k${i}`, TagValue: 'v' })) }, 'aws_param.Tags'],
    ['duplicate tag keys', {}, { Tags: [{ TagKey: 'k', TagValue: 'a' }, { TagKey: 'k', TagValue: 'b' }] }, 'aws_param.Tags'],
    ['tag with an extra field', {}, { Tags: [{ TagKey: 'k', TagValue: 'v', Extra: 1 }] }, 'aws_param.Tags[0].Extra'],
    ['alias with a space', {}, { Alias: 'my key' }, 'aws_param.Alias'],
    ['alias in the aws/ namespace', {}, { Alias: 'alias/aws/ebs' }, 'aws_param.Alias'],
    ['Policy that is not JSON', {}, { Policy: '{not json' }, 'aws_param.Policy'],
    ['MultiRegion as a string', {}, { MultiRegion: 'true' }, 'aws_param.MultiRegion'],
    ['ValidTo not RFC 3339', { KeyExpiration: true }, { ValidTo: '2027-01-01 00:00' }, 'aws_param.ValidTo'],
    ['ValidTo in the past', { KeyExpiration: true }, { ValidTo: inDays(-1) }, 'aws_param.ValidTo'],
    ['ValidTo beyond 365 days', { KeyExpiration: true }, { ValidTo: inDays(366) }, 'aws_param.ValidTo'],
    ['KeyExpiration without ValidTo', { KeyExpiration: true }, {}, 'aws_param.ValidTo'],
    ['ValidTo without KeyExpiration', {}, { ValidTo: inDays(30) }, 'aws_param.ValidTo'],
    ['external account not 12 digits', { external_accounts: ['12345'] }, {}, 'external_accounts[0]'],
    ['key_users not strings', { key_users: [42] }, {}, 'key_users[0]'],
    ['callback_url not http(s)', { callback_url: 'ftp://example.com/hook' }, {}, 'callback_url'],
  ])('when %s, then the error names %s', (_name, overrides, awsParam, path) => {
    expect(errorPaths(buildBody(overrides, awsParam))).toContain(path);
  });

  it.each([
    ['Policy and policytemplate', { policytemplate: 't1' }, { Policy: '{"Version":"2012-10-17"}' }, ['aws_param.Policy', 'policytemplate']],
    ['Policy and key_users', { key_users: ['alice'] }, { Policy: '{"Version":"2012-10-17"}' }, ['aws_param.Policy', 'key_users']],
    ['policytemplate and external_accounts', { policytemplate: 't1', external_accounts: ['111122223333'] }, {}, ['policytemplate', 'external_accounts']],
  ])('when %s are both given, then both paths are reported as mutually exclusive', (_n, overrides, awsParam, paths) => {
    expect(errorPaths(buildBody(overrides, awsParam))).toEqual(expect.arrayContaining(paths));
  });

  it('when several principal lists are given together, then they are accepted (one group)', () => {
    expect(errorPaths(buildBody({ key_admins: ['alice'], key_users_roles: ['app'], external_accounts: ['111122223333'] }))).toEqual([]);
  });

  it('when the source tier is an HSM or a KMIP server, then source_connection is required, and refused for local keys', () => {
    for (const tier of ['hsm-luna', 'dsm']) {
      expect(errorPaths(buildBody({ source_key_tier: tier }))).toEqual(['source_connection']);
      expect(errorPaths(buildBody({ source_key_tier: tier, source_connection: 'conn' }))).toEqual([]);
    }
    expect(errorPaths(buildBody({ source_key_tier: 'local', source_connection: 'conn' }))).toEqual(['source_connection']);
    expect(errorPaths(buildBody({ source_key_tier: undefined, source_connection: 'conn' }))).toEqual(['source_connection']);
    expect(errorPaths(buildBody({ source_key_tier: 'dsm', source_connection: '' }))).toEqual(['source_connection']);
    expect(errorPaths(buildBody({ source_key_tier: 'dsm', source_connection: 'prod|x' }))).toEqual(['source_connection']);
  });

  it('when KeyExpiration is true with a ValidTo 30 days ahead, then it is accepted', () => {
    expect(errorPaths(buildBody({ KeyExpiration: true }, { ValidTo: inDays(30) }))).toEqual([]);
  });

  it('when many fields are wrong at once, then every path is reported in one error', () => {
    const paths = errorPaths({
      region: 7,
      kms: '',
      KeyExpiration: true,
      policytemplate: 'p',
      key_users: ['bob'],
      bogus: 1,
      aws_param: { Alias: 'bad alias', Tags: [{ TagKey: 'k', TagValue: 'bad value' }] },
    });
    expect(paths).toEqual(
      expect.arrayContaining([
        'source_key_identifier',
        'region',
        'kms',
        'bogus',
        'aws_param.Alias',
        'aws_param.Tags[0].TagValue',
        'aws_param.ValidTo',
        'policytemplate',
        'key_users',
      ]),
    );
  });

  it('when the body is not an object, then the body itself is reported', () => {
    expect(errorPaths([1, 2])).toEqual(['(body)']);
    expect(errorPaths(null)).toEqual(['(body)']);
  });
});

describe('the tags keyferry adds', () => {
  it('when keyferry tags a key with its job, then that tag key is one a request may not use, and a request may name one tag fewer than AWS allows', () => {
    expect(JOB_TAG_KEY.startsWith(RESERVED_TAG_PREFIX)).toBe(true);
    expect(() => parseUploadKey(buildBody({}, { Tags: [{ TagKey: JOB_TAG_KEY, TagValue: 'x' }] }))).toThrow(ValidationError);
  });
});
