import { PipelineError } from '../shared/errors.js';

/** AWS error names whose retry can succeed: throttling, AWS-side faults, timeouts, an expired token. */
const RETRYABLE = new Set([
  'ThrottlingException',
  'TooManyRequestsException',
  'KMSInternalException',
  'DependencyTimeoutException',
  'ServiceUnavailable',
  'ServiceUnavailableException',
  'InternalFailure',
  'RequestTimeout',
  'RequestTimeoutException',
  'ExpiredImportTokenException',
  'TimeoutError',
  'AbortError',
]);

/** Stable codes for the permanent AWS failures clients may want to act on. */
const PERMANENT: Record<string, string> = {
  AccessDeniedException: 'aws_access_denied',
  UnrecognizedClientException: 'aws_credentials_invalid',
  InvalidSignatureException: 'aws_credentials_invalid',
  AlreadyExistsException: 'alias_taken',
  IncorrectKeyMaterialException: 'incorrect_key_material',
  InvalidCiphertextException: 'incorrect_key_material',
  InvalidImportTokenException: 'invalid_import_token',
  ValidationException: 'aws_validation_failed',
  MalformedPolicyDocumentException: 'malformed_policy',
  TagException: 'invalid_tags',
  NotFoundException: 'aws_key_not_found',
  KMSInvalidStateException: 'aws_invalid_key_state',
  LimitExceededException: 'aws_limit_exceeded',
  UnsupportedOperationException: 'aws_unsupported_operation',
};

const NETWORK_CODES = new Set(['ECONNREFUSED', 'ECONNRESET', 'ETIMEDOUT', 'EPIPE', 'EHOSTUNREACH', 'ENETUNREACH', 'EAI_AGAIN', 'ENOTFOUND', 'UND_ERR_SOCKET']);

interface AwsLikeError {
  name?: string;
  message?: string;
  code?: string;
  $metadata?: { httpStatusCode?: number };
}

/** Maps anything thrown during the pipeline to a PipelineError: the one retry-or-fail decision. */
export function classify(err: unknown): PipelineError {
  if (err instanceof PipelineError) return err;
  const e = (typeof err === 'object' && err !== null ? err : {}) as AwsLikeError;
  const name = e.name ?? 'Error';
  const message = e.message ?? String(err);
  const status = e.$metadata?.httpStatusCode;

  if (RETRYABLE.has(name)) return new PipelineError(name === 'ExpiredImportTokenException' ? 'import_token_expired' : 'aws_unavailable', `${name}: ${message}`, true);
  if (e.code && NETWORK_CODES.has(e.code)) return new PipelineError('aws_unreachable', `${e.code}: ${message}`, true);
  // The SDK found no credentials: a connection without keys on a worker with no AWS identity of its own (or
  // its instance metadata service did not answer). Retried, in case the identity comes back, but named.
  if (name === 'CredentialsProviderError') return new PipelineError('aws_credentials_unavailable', `${name}: ${message}`, true);
  const permanent = PERMANENT[name];
  if (permanent) return new PipelineError(permanent, `${name}: ${message}`, false);
  if (status !== undefined && (status >= 500 || status === 429)) return new PipelineError('aws_unavailable', `${name} (HTTP ${status}): ${message}`, true);
  if (status !== undefined && status >= 400) return new PipelineError('aws_request_rejected', `${name} (HTTP ${status}): ${message}`, false);
  // Unknown failures (a bug, a dropped connection without a code) are retried: retrying is safe, giving up is not.
  return new PipelineError('internal_error', `${name}: ${message}`, true);
}

/**
 * How long after its CreateKey a key may still be unknown to parts of KMS. AWS documents KMS as eventually
 * consistent: a change usually reaches all of KMS within seconds, in some cases minutes, and meanwhile calls
 * can fail with NotFoundException or KMSInvalidStateException, e.g. GetParametersForImport right after
 * CreateKey ("AWS KMS eventual consistency" in the KMS developer guide).
 */
export const NEW_KEY_SETTLING_MS = 10 * 60_000;
/** How far behind the clock of the worker that recorded the create_key intent another worker's clock may be. */
const CLOCK_SKEW_MS = 60_000;

/**
 * classify, for the failure of an attempt whose job made its KMS key at `keyMadeAt` (the create_key intent's
 * time; undefined when the job has no key yet): a NotFoundException or KMSInvalidStateException within
 * NEW_KEY_SETTLING_MS of it (or up to CLOCK_SKEW_MS before it, as this worker's clock tells) is taken for KMS's
 * eventual consistency and retried, with the same code. Later, the key is taken to be gone or in a state that
 * will not change by itself (deleted, disabled), and the job fails.
 */
export function classifyAttempt(err: unknown, keyMadeAt: string | undefined, now = Date.now()): PipelineError {
  const e = classify(err);
  if (e.retryable || (e.code !== 'aws_key_not_found' && e.code !== 'aws_invalid_key_state') || keyMadeAt === undefined) return e;
  const age = now - Date.parse(keyMadeAt);
  if (!(age > -CLOCK_SKEW_MS && age < NEW_KEY_SETTLING_MS)) return e;
  return new PipelineError(e.code, `${e.message} (the key was made ${Math.max(0, Math.round(age / 1000))} s ago; KMS may not know it everywhere yet)`, true);
}
