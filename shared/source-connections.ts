import { z } from 'zod';
import type { WrappingAlgorithm } from './crypto.js';
import type { AccountResource } from './stores/resource-store.js';

/*
 * Connections to the key sources of the `hsm-luna` (PKCS#11) and `dsm` (KMIP) tiers. An upload names one in
 * `source_connection`. Secrets (the HSM user PIN, the KMIP client's private key) are sealed with the
 * connection's own context and never returned.
 */

const name = z.string().min(1).max(128).regex(/^[A-Za-z0-9_.@-]+$/, 'Names allow letters, digits and _ . @ -.');
/** A PEM block of this label; a plain scan, no regular expression over the whole (up to 64 KiB) value. The API parses it fully. */
const pem = (label: string) =>
  z
    .string()
    .max(65_536)
    .refine((v) => {
      const text = v.trim();
      const begin = text.indexOf(`${label}-----`);
      return text.startsWith('-----BEGIN ') && begin > 0 && text.endsWith(`${label}-----`) && text.lastIndexOf('-----END ') > begin;
    }, `Must be a PEM ${label.toLowerCase()}.`);

export const HSM_WRAPPING_ALGORITHMS = ['RSAES_OAEP_SHA_256', 'RSAES_OAEP_SHA_1'] as const satisfies readonly WrappingAlgorithm[];

// ---- HSM (PKCS#11) -----------------------------------------------------------------------------

export const hsmConnectionSchema = z
  .strictObject({
    name,
    /** Path of the PKCS#11 library on the workers; it must be one the operator allows (HSM_LIBRARIES). */
    library: z.string().min(1).max(1024).regex(/^\//, 'Must be an absolute path.'),
    token_label: z.string().min(1).max(32).optional(),
    slot: z.number().int().min(0).max(0xffff_ffff).optional(),
    pin: z.string().min(1).max(256),
    /** The OAEP hash the HSM wraps with (C_WrapKey, CKM_RSA_PKCS_OAEP); SoftHSM2 supports only SHA-1. */
    wrapping_algorithm: z.enum(HSM_WRAPPING_ALGORITHMS).default('RSAES_OAEP_SHA_256'),
  })
  .refine((b) => (b.token_label === undefined) !== (b.slot === undefined), {
    path: ['token_label'],
    message: 'Give exactly one of token_label and slot.',
  });

export interface HsmConnection extends AccountResource {
  library: string;
  token_label: string | null;
  slot: number | null;
  pin_sealed: string;
  wrapping_algorithm: WrappingAlgorithm;
}

export const hsmConnectionView = (c: HsmConnection) => ({
  id: c.id,
  name: c.name,
  library: c.library,
  token_label: c.token_label,
  slot: c.slot,
  wrapping_algorithm: c.wrapping_algorithm,
  created_at: c.created_at,
  updated_at: c.updated_at,
});

export const hsmPinContext = (account: string, id: string) => `hsm-pin:${account}:${id}`;

/**
 * One entry of HSM_TOKENS: `account` (or `*`, any account) may register and use connections to the token with
 * this label, or in this slot, of any library HSM_LIBRARIES allows. Exactly one of `label` and `slot` is set.
 */
export interface HsmTokenRule {
  account: string;
  label: string | null;
  slot: number | null;
}

/** `ACCOUNT:label=LABEL` or `ACCOUNT:slot=N`; the account ends at the first `:label=` or `:slot=`. */
const HSM_TOKEN_ENTRY = /^(.+?):(?:label=(.{1,32})|slot=(\d{1,10}))$/s;

/**
 * HSM_TOKENS: comma-separated `ACCOUNT:label=LABEL` / `ACCOUNT:slot=N` entries (ACCOUNT `*`: any account).
 * Empty: no account may use any token, so no HSM connection can be registered or used.
 */
export const hsmTokenListSchema = z.string().transform((list, ctx): HsmTokenRule[] => {
  if (list.trim() === '') return [];
  const rules: HsmTokenRule[] = [];
  for (const raw of list.split(',')) {
    const entry = raw.trim();
    const m = HSM_TOKEN_ENTRY.exec(entry);
    const slot = m?.[3] === undefined ? null : Number(m[3]);
    if (!m || (slot !== null && slot > 0xffff_ffff)) {
      ctx.addIssue({
        code: 'custom',
        message: `"${entry}" is not ACCOUNT:label=LABEL (up to 32 characters) or ACCOUNT:slot=N; entries are comma-separated and ACCOUNT may be * (any account)`,
      });
      return z.NEVER;
    }
    rules.push({ account: m[1] as string, label: m[2] ?? null, slot });
  }
  return rules;
});

/** Whether HSM_TOKENS lets `account` use the token a connection names (by label or by slot). */
export function hsmTokenAllowed(rules: readonly HsmTokenRule[], account: string, token: { token_label: string | null; slot: number | null }): boolean {
  return rules.some(
    (r) => (r.account === '*' || r.account === account) && (r.label !== null ? token.token_label !== null && r.label === token.token_label : token.slot !== null && r.slot === token.slot),
  );
}

/** The tokens HSM_TOKENS lets `account` use, for messages to that account (never other accounts' entries). */
export function hsmTokensOf(rules: readonly HsmTokenRule[], account: string): string {
  const mine = rules.filter((r) => r.account === '*' || r.account === account).map((r) => (r.label !== null ? `label "${r.label}"` : `slot ${r.slot}`));
  return mine.length > 0 ? [...new Set(mine)].join(', ') : 'none';
}

// ---- DSM (KMIP) --------------------------------------------------------------------------------

export const KMIP_VERSIONS = ['1.2', '1.3', '1.4', '2.0'] as const;
export type KmipVersion = (typeof KMIP_VERSIONS)[number];

export const dsmConnectionSchema = z.strictObject({
  name,
  host: z
    .string()
    .min(1)
    .max(253)
    .regex(/^[A-Za-z0-9.:-]+$/, 'Must be a host name or an IP address.'),
  port: z.number().int().min(1).max(65_535).default(5696),
  /** The name the server's certificate must carry; defaults to host. */
  server_name: z.string().min(1).max(253).optional(),
  ca_certificate: pem('CERTIFICATE'),
  client_certificate: pem('CERTIFICATE'),
  client_key: pem('PRIVATE KEY'),
  /** Highest KMIP version to offer; the server's answer to DiscoverVersions decides. */
  kmip_version: z.enum(KMIP_VERSIONS).optional(),
});

export interface DsmConnection extends AccountResource {
  host: string;
  port: number;
  server_name: string | null;
  ca_certificate: string;
  client_certificate: string;
  client_key_sealed: string;
  kmip_version: KmipVersion | null;
}

export const dsmConnectionView = (c: DsmConnection) => ({
  id: c.id,
  name: c.name,
  host: c.host,
  port: c.port,
  server_name: c.server_name,
  ca_certificate: c.ca_certificate,
  client_certificate: c.client_certificate,
  kmip_version: c.kmip_version,
  created_at: c.created_at,
  updated_at: c.updated_at,
});

export const dsmKeyContext = (account: string, id: string) => `dsm-client-key:${account}:${id}`;
