import { PipelineError } from '../../shared/errors.js';

/**
 * PKCS#11 return values (pkcs11js throws a Pkcs11Error whose message is the CKR_ name and whose code is the
 * CK_RV) mapped to keyferry's stable error codes. Nothing from a key or a PIN ever enters a message.
 */

/** The session (or the whole login) is gone: drop the pool's sessions, reopen, retry the operation once. */
const SESSION_LOST = new Set([
  'CKR_SESSION_HANDLE_INVALID',
  'CKR_SESSION_CLOSED',
  'CKR_DEVICE_REMOVED',
  'CKR_DEVICE_ERROR',
  'CKR_TOKEN_NOT_PRESENT',
  'CKR_TOKEN_NOT_RECOGNIZED',
  'CKR_USER_NOT_LOGGED_IN',
  'CKR_CRYPTOKI_NOT_INITIALIZED',
  'CKR_OBJECT_HANDLE_INVALID',
  'CKR_KEY_HANDLE_INVALID',
  // The slot found for the token's label no longer exists (the token was initialised again, or its HSM
  // reconfigured): the pool looks for the token by its label again.
  'CKR_SLOT_ID_INVALID',
]);

/** The HSM or its token is away or failing: another attempt later may succeed. */
const UNAVAILABLE = new Set([
  ...SESSION_LOST,
  'CKR_DEVICE_MEMORY',
  'CKR_HOST_MEMORY',
  'CKR_GENERAL_ERROR',
  'CKR_FUNCTION_FAILED',
  'CKR_FUNCTION_CANCELED',
  'CKR_SESSION_COUNT',
  'CKR_CANT_LOCK',
]);

/** The PIN will not do: retrying would only count more failed logins against the user (and lock it). */
const AUTH = new Set(['CKR_PIN_INCORRECT', 'CKR_PIN_INVALID', 'CKR_PIN_LEN_RANGE', 'CKR_PIN_EXPIRED', 'CKR_PIN_LOCKED', 'CKR_USER_PIN_NOT_INITIALIZED']);

const NOT_EXTRACTABLE = new Set(['CKR_KEY_UNEXTRACTABLE', 'CKR_KEY_NOT_WRAPPABLE']);

/** What an HSM answers C_WrapKey with when it does not do CKM_RSA_PKCS_OAEP with the hash asked for. */
const WRAP_UNSUPPORTED = new Set(['CKR_MECHANISM_INVALID', 'CKR_MECHANISM_PARAM_INVALID', 'CKR_ARGUMENTS_BAD', 'CKR_KEY_TYPE_INCONSISTENT', 'CKR_WRAPPING_KEY_TYPE_INCONSISTENT', 'CKR_WRAPPING_KEY_SIZE_RANGE']);

interface Pkcs11ErrorLike {
  name?: unknown;
  message?: unknown;
  code?: unknown;
}

/** The CKR_ name of a PKCS#11 failure; undefined for anything else. */
export function ckrName(err: unknown): string | undefined {
  const e = (typeof err === 'object' && err !== null ? err : {}) as Pkcs11ErrorLike;
  if (e.name !== 'Pkcs11Error') return undefined;
  if (typeof e.message === 'string' && /^CKR_\w+$/.test(e.message)) return e.message;
  return typeof e.code === 'number' ? `CKR_0x${e.code.toString(16).padStart(8, '0')}` : 'CKR_UNKNOWN';
}

export function isPinFailure(err: unknown): boolean {
  return AUTH.has(ckrName(err) ?? '');
}

export function isSessionLost(err: unknown): boolean {
  return SESSION_LOST.has(ckrName(err) ?? '');
}

export interface Pkcs11ErrorContext {
  /** The HSM connection's name, for messages. */
  connection: string;
  /** What was being done, e.g. "finding the key" or "C_WrapKey". */
  doing: string;
  step: 'resolve' | 'wrap';
  algorithm?: string;
}

/** Maps whatever an HSM operation threw to the PipelineError the job records. */
export function classifyPkcs11(err: unknown, ctx: Pkcs11ErrorContext): PipelineError {
  if (err instanceof PipelineError) return err;
  const ckr = ckrName(err);
  const where = `HSM connection "${ctx.connection}", ${ctx.doing}`;
  if (ckr === undefined) return new PipelineError('source_hsm_error', `${where}: ${(err as Error)?.message ?? String(err)}`, true);
  if (AUTH.has(ckr)) return new PipelineError('source_auth_failed', `${where}: the HSM refused the connection's PIN (${ckr}).`, false);
  if (NOT_EXTRACTABLE.has(ckr)) {
    return new PipelineError('source_key_not_extractable', `${where}: the HSM will not wrap this key (${ckr}); only keys with CKA_EXTRACTABLE true can be uploaded.`, false);
  }
  if (ctx.step === 'wrap' && WRAP_UNSUPPORTED.has(ckr)) {
    return new PipelineError(
      'source_wrapping_not_supported',
      `${where}: the HSM refused CKM_RSA_PKCS_OAEP with ${ctx.algorithm ?? 'this hash'} (${ckr}). Some HSMs (SoftHSM2) wrap only with SHA-1 OAEP: register the connection with wrapping_algorithm RSAES_OAEP_SHA_1.`,
      false,
    );
  }
  if (UNAVAILABLE.has(ckr)) return new PipelineError('source_unavailable', `${where}: the HSM or its token is unavailable (${ckr}).`, true);
  // Unknown and vendor-defined return values (HA and network failures of network HSMs among them) are retried.
  return new PipelineError('source_hsm_error', `${where}: ${ckr}.`, true);
}
