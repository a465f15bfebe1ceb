import { z } from 'zod';
import { kmsQuotaOverridesSchema, type KmsQuotaOverrides } from './kms-quotas.js';
import { REGION_RE } from './schemas/upload-key.js';
import type { AccountResource } from './stores/resource-store.js';

const name = z.string().min(1).max(128).regex(/^[A-Za-z0-9_.@-]+$/, 'Names allow letters, digits and _ . @ -.');
const region = z.string().regex(REGION_RE, 'Must be an AWS region name such as ap-south-1.');
export const WRAPPING_KEY_SPECS = ['RSA_2048', 'RSA_3072', 'RSA_4096'] as const;
export type WrappingKeySpec = (typeof WRAPPING_KEY_SPECS)[number];

// ---- KMS connections ---------------------------------------------------------------------------

export const kmsConnectionSchema = z
  .strictObject({
    name,
    account_id: z.string().regex(/^\d{12}$/, 'Must be a 12-digit AWS account id.'),
    regions: z.array(region).min(1).max(64),
    aws_access_key_id: z.string().regex(/^[A-Z0-9]{16,128}$/, 'Must be an AWS access key id.').optional(),
    aws_secret_access_key: z.string().min(16).max(256).optional(),
    endpoint: z.url({ protocol: /^https?$/ }).optional(),
    wrapping_key_spec: z.enum(WRAPPING_KEY_SPECS).optional(),
    /** This AWS account's own KMS request quotas (requests per second, per region), over KMS_QUOTAS. */
    quotas: kmsQuotaOverridesSchema.optional(),
  })
  .refine((b) => (b.aws_access_key_id === undefined) === (b.aws_secret_access_key === undefined), {
    path: ['aws_secret_access_key'],
    message: 'aws_access_key_id and aws_secret_access_key go together.',
  });

export type KmsCredentials = { type: 'default' } | { type: 'access_key'; access_key_id: string; secret_sealed: string };

export interface KmsConnection extends AccountResource {
  account_id: string;
  regions: string[];
  credentials: KmsCredentials;
  endpoint: string | null;
  wrapping_key_spec: WrappingKeySpec | null;
  /** Absent on connections made before quotas were configurable: the same as none. */
  quotas?: KmsQuotaOverrides;
}

/** What the API shows: never the secret. */
export function kmsConnectionView(c: KmsConnection) {
  return {
    id: c.id,
    name: c.name,
    account_id: c.account_id,
    regions: c.regions,
    credentials_type: c.credentials.type,
    aws_access_key_id: c.credentials.type === 'access_key' ? c.credentials.access_key_id : null,
    endpoint: c.endpoint,
    wrapping_key_spec: c.wrapping_key_spec,
    quotas: c.quotas ?? {},
    created_at: c.created_at,
    updated_at: c.updated_at,
  };
}

/** The sealing context binds a secret to its connection. */
export const kmsSecretContext = (account: string, id: string) => `kms-secret:${account}:${id}`;

// ---- policy templates --------------------------------------------------------------------------

/** AWS's size limit of a key policy. */
const MAX_POLICY_CHARS = 32_768;
/** Key policies nest a few levels; the cap keeps JSON.stringify (recursive) of a hostile document within the stack. */
const MAX_POLICY_DEPTH = 32;

const jsonObject = z.record(z.string(), z.unknown());
const POLICY_MESSAGE = 'Must be a JSON key policy document: an object, or a string holding one.';

/** A key policy document, as an object or as a string holding one; the output is its compact JSON. */
const policyDocument = z
  .union(
    [
      jsonObject,
      z.string().transform((s, ctx) => {
        const doc = jsonObject.safeParse(parseJson(s));
        if (doc.success) return doc.data;
        ctx.addIssue({ code: 'custom', message: POLICY_MESSAGE });
        return z.NEVER;
      }),
    ],
    { error: POLICY_MESSAGE },
  )
  .refine((doc) => !nestedDeeperThan(doc, MAX_POLICY_DEPTH), `Must not nest objects and arrays more than ${MAX_POLICY_DEPTH} levels deep.`)
  .transform((doc) => JSON.stringify(doc))
  .refine((json) => json.length <= MAX_POLICY_CHARS, `Must be at most ${MAX_POLICY_CHARS} characters as JSON (AWS's limit).`);

export const templateSchema = z.strictObject({ name, policy: policyDocument });

function parseJson(s: string): unknown {
  try {
    return JSON.parse(s);
  } catch {
    return undefined;
  }
}

/** True when objects and arrays in `value` nest more than `max` levels; iterative, so any depth is safe to ask. */
function nestedDeeperThan(value: unknown, max: number): boolean {
  const pending: [unknown, number][] = [[value, 1]];
  for (let next = pending.pop(); next; next = pending.pop()) {
    const [v, depth] = next;
    if (typeof v !== 'object' || v === null) continue;
    if (depth > max) return true;
    for (const child of Object.values(v)) pending.push([child, depth + 1]);
  }
  return false;
}

export interface PolicyTemplate extends AccountResource {
  policy: string;
}

export const templateView = (t: PolicyTemplate) => ({ ...t, policy: JSON.parse(t.policy) as unknown });

// ---- local keys (vault keys2) ------------------------------------------------------------------

export const localKeySchema = z.strictObject({
  name,
  algorithm: z.literal('AES', { message: 'Only AES keys can be uploaded to AWS KMS.' }).default('AES'),
  size: z.literal(256, { message: 'AWS KMS imports 256-bit symmetric keys.' }).default(256),
  material: z.string().regex(/^[0-9a-fA-F]{64}$/, 'Must be 32 bytes as 64 hex characters.').optional(),
});

export interface LocalKey extends AccountResource {
  algorithm: 'AES';
  size: 256;
  origin: 'generated' | 'imported';
  material_sealed: string;
}

export const localKeyView = (k: LocalKey) => ({
  id: k.id,
  name: k.name,
  algorithm: k.algorithm,
  size: k.size,
  origin: k.origin,
  created_at: k.created_at,
  updated_at: k.updated_at,
});

export const localKeyContext = (account: string, id: string) => `local-key:${account}:${id}`;
