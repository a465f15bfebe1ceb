import { z } from 'zod';
import type { AccountResource } from './stores/resource-store.js';

const name = z.string().min(1).max(128).regex(/^[A-Za-z0-9_.@-]+$/, 'Names allow letters, digits and _ . @ -.');
const region = z.string().regex(/^[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-\d{1,2}$/, 'Must be an AWS region name such as ap-south-1.');
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
    created_at: c.created_at,
    updated_at: c.updated_at,
  };
}

/** The sealing context binds a secret to its connection. */
export const kmsSecretContext = (account: string, id: string) => `kms-secret:${account}:${id}`;

// ---- policy templates --------------------------------------------------------------------------

export const templateSchema = z.strictObject({
  name,
  policy: z.union([
    z.record(z.string(), z.unknown()),
    z.string().refine((s) => {
      try {
        const v: unknown = JSON.parse(s);
        return typeof v === 'object' && v !== null && !Array.isArray(v);
      } catch {
        return false;
      }
    }, 'Must be a JSON key policy document.'),
  ]),
});

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
