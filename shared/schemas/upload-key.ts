import { z } from 'zod';
import type { FieldError } from '../errors.js';
import { parseOrThrow } from '../validation.js';

export const SOURCE_KEY_TIERS = ['local', 'dsm', 'hsm-luna'] as const;
export type SourceKeyTier = (typeof SOURCE_KEY_TIERS)[number];
export const MAX_VALID_TO_DAYS = 365;

/** CCKM's rule for tag values: alphanumerics and `_ . / = + - @`. */
export const TAG_VALUE_RE = /^[A-Za-z0-9_./=+\-@]*$/;
/** AWS's rule for tag keys: letters, digits, spaces and `_ . : / = + - @`. */
const TAG_KEY_RE = /^[\p{L}\p{Z}\p{N}_.:/=+\-@]+$/u;
const ALIAS_RE = /^[A-Za-z0-9/_-]+$/;
/** keyferry tags every key it makes (`keyferry:job-id`, worker/result.ts): a request's tag keys may not start so. */
export const RESERVED_TAG_PREFIX = 'keyferry:';
/** AWS allows 50 tags on a KMS key; keyferry adds its one, so a request may name 49. */
export const MAX_REQUEST_TAGS = 49;
/** An AWS region name (`ap-south-1`, `us-gov-west-1`, `cn-north-1`). */
export const REGION_RE = /^[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-\d{1,2}$/;
const ACCOUNT_RE = /^\d{12}$/;
const IAM_NAME_RE = /^[\w+=,.@-]{1,128}$/;
const IAM_ARN_RE = /^arn:aws[a-z-]*:iam::\d{12}:(user|role|root)(\/[\w+=,.@/-]*)?$/;

const principal = z
  .string()
  .refine((v) => IAM_NAME_RE.test(v) || IAM_ARN_RE.test(v), 'Must be an IAM name or an IAM ARN.');

const tag = z.strictObject({
  TagKey: z
    .string()
    .min(1)
    .max(128)
    .regex(TAG_KEY_RE, 'Tag keys allow letters, digits, spaces and _ . : / = + - @.')
    .refine((k) => !k.toLowerCase().startsWith('aws:'), 'Tag keys must not start with "aws:".')
    .refine((k) => !k.toLowerCase().startsWith(RESERVED_TAG_PREFIX), `Tag keys must not start with "${RESERVED_TAG_PREFIX}": keyferry tags the keys it makes.`),
  TagValue: z.string().max(256).regex(TAG_VALUE_RE, 'Tag values allow only alphanumerics and _ . / = + - @.'),
});

const rfc3339 = z.iso.datetime({ offset: true, message: 'Must be an RFC 3339 date-time, e.g. 2027-01-31T00:00:00Z.' });

export const awsParamSchema = z.strictObject({
  Alias: z
    .string()
    .transform((a) => (a.startsWith('alias/') ? a.slice('alias/'.length) : a))
    .pipe(
      z
        .string()
        .min(1)
        .max(250)
        .regex(ALIAS_RE, 'Aliases allow letters, digits, / _ and -.')
        .refine((a) => !a.startsWith('aws/'), 'The alias/aws/ prefix is reserved for AWS managed keys.'),
    )
    .optional(),
  BypassPolicyLockoutSafetyCheck: z.boolean().optional(),
  Description: z.string().max(8192).optional(),
  MultiRegion: z.boolean().optional(),
  Policy: z
    .string()
    .min(1)
    .max(32768)
    .refine(isJsonObject, 'Must be a JSON key policy document (a JSON object in a string).')
    .optional(),
  Tags: z
    .array(tag)
    .max(MAX_REQUEST_TAGS, `At most ${MAX_REQUEST_TAGS} tags: AWS allows 50 on a key, and keyferry adds its own (${RESERVED_TAG_PREFIX}job-id).`)
    .refine((tags) => new Set(tags.map((t) => t.TagKey)).size === tags.length, 'Tag keys must be unique.')
    .optional(),
  ValidTo: rfc3339.optional(),
});

const principalList = z.array(principal).max(100).optional();

export const uploadKeySchema = z.strictObject({
  source_key_tier: z.enum(SOURCE_KEY_TIERS).default('local'),
  source_key_identifier: z.string().min(1).max(256),
  /** keyferry's addition: the HSM (hsm-luna) or KMIP server (dsm) connection holding the source key, by name or id. */
  source_connection: z
    .string()
    .regex(/^[A-Za-z0-9_.@-]{1,128}$/, 'Must be the name or id of an HSM or DSM connection (1-128 letters, digits and _ . @ -).')
    .optional(),
  region: z.string().regex(REGION_RE, 'Must be an AWS region name such as ap-south-1.'),
  kms: z.string().min(1).max(128),
  KeyExpiration: z.boolean().default(false),
  aws_param: awsParamSchema.default({}),
  external_accounts: z.array(z.string().regex(ACCOUNT_RE, 'Must be a 12-digit AWS account id.')).max(100).optional(),
  key_admins: principalList,
  key_admins_roles: principalList,
  key_users: principalList,
  key_users_roles: principalList,
  policytemplate: z.string().min(1).max(128).optional(),
  callback_url: z
    .url({ protocol: /^https?$/, message: 'Must be an http(s) URL.' })
    .max(2048)
    .optional(),
});

export type UploadKeyRequest = z.output<typeof uploadKeySchema>;

export const PRINCIPAL_FIELDS = ['key_admins', 'key_admins_roles', 'key_users', 'key_users_roles', 'external_accounts'] as const;

function isJsonObject(s: string): boolean {
  try {
    const v: unknown = JSON.parse(s);
    return typeof v === 'object' && v !== null && !Array.isArray(v);
  } catch {
    return false;
  }
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/**
 * The spec's rules that span fields, checked on the raw body so that they are reported together
 * with the per-field errors: Policy / policytemplate / principal lists are mutually exclusive;
 * ValidTo goes with KeyExpiration; ValidTo lies in the future and at most 365 days ahead.
 */
export function crossFieldErrors(body: unknown, now = Date.now()): FieldError[] {
  if (!isRecord(body)) return [];
  const errors: FieldError[] = [];
  const awsParam = isRecord(body.aws_param) ? body.aws_param : {};

  const groups: { name: string; paths: string[] }[] = [];
  if (awsParam.Policy !== undefined) groups.push({ name: 'aws_param.Policy', paths: ['aws_param.Policy'] });
  if (body.policytemplate !== undefined) groups.push({ name: 'policytemplate', paths: ['policytemplate'] });
  const lists = PRINCIPAL_FIELDS.filter((f) => Array.isArray(body[f]) && (body[f] as unknown[]).length > 0);
  if (lists.length > 0) groups.push({ name: 'the principal lists', paths: [...lists] });
  if (groups.length > 1) {
    for (const g of groups) {
      const others = groups.filter((o) => o !== g).map((o) => o.name);
      for (const path of g.paths) {
        errors.push({ path, message: `Mutually exclusive with ${others.join(' and ')}: give Policy, policytemplate, or principal lists, not several.` });
      }
    }
  }

  const tier = body.source_key_tier ?? 'local';
  if ((tier === 'hsm-luna' || tier === 'dsm') && body.source_connection === undefined) {
    errors.push({ path: 'source_connection', message: `Required when source_key_tier is "${tier}": the ${tier === 'dsm' ? 'DSM (KMIP)' : 'HSM'} connection holding the key.` });
  }
  if (tier === 'local' && body.source_connection !== undefined) {
    errors.push({ path: 'source_connection', message: 'Only allowed when source_key_tier is "hsm-luna" or "dsm".' });
  }

  const validTo = awsParam.ValidTo;
  if (body.KeyExpiration === true && validTo === undefined) {
    errors.push({ path: 'aws_param.ValidTo', message: 'Required when KeyExpiration is true.' });
  }
  if (validTo !== undefined && body.KeyExpiration !== true) {
    errors.push({ path: 'aws_param.ValidTo', message: 'Only allowed when KeyExpiration is true.' });
  }
  if (typeof validTo === 'string' && rfc3339.safeParse(validTo).success) {
    const t = Date.parse(validTo);
    if (t <= now) errors.push({ path: 'aws_param.ValidTo', message: 'Must be in the future.' });
    else if (t > now + MAX_VALID_TO_DAYS * 86_400_000) {
      errors.push({ path: 'aws_param.ValidTo', message: `Must be at most ${MAX_VALID_TO_DAYS} days ahead (AWS's limit).` });
    }
  }
  return errors;
}

/** Validates an upload-key body; throws ValidationError with every offending field path. */
export function parseUploadKey(body: unknown, now = Date.now()): UploadKeyRequest {
  return parseOrThrow(uploadKeySchema, body, crossFieldErrors(body, now));
}
