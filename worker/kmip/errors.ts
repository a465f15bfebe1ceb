import { nameOf, resultReasonName, ResultStatus, versionString, type ProtocolVersion } from './tags.js';

/** Longest server-sent text (a Result Message) kept, in characters. */
export const MAX_SERVER_TEXT = 200;

/**
 * Text a server sent, made safe to show and log: C0/C1 control characters, line and paragraph separators and
 * bidirectional overrides become spaces, runs of spaces collapse, and it is cut to `max` characters.
 */
export function serverText(text: string, max = MAX_SERVER_TEXT): string {
  // eslint-disable-next-line no-control-regex
  const clean = text.replace(/[\u0000-\u001f\u007f-\u009f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]+/g, ' ').replace(/ {2,}/g, ' ').trim();
  const chars = [...clean]; // by code point, so a surrogate pair is never cut in half
  return chars.length <= max ? clean : `${chars.slice(0, max - 1).join('')}…`;
}

/** Every failure of the KMIP client is one of these; worker/sources/dsm.ts maps them to pipeline error codes. */
export abstract class KmipError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** The server answered a request with a Result Status other than Success. */
export class KmipResultError extends KmipError {
  constructor(
    readonly operation: string,
    readonly resultStatus: number,
    readonly resultReason: number | undefined,
    readonly resultMessage: string | undefined,
  ) {
    super(
      `KMIP ${operation} failed: ${nameOf(ResultStatus, resultStatus)}, reason ${resultReasonName(resultReason)}` +
        (resultMessage ? `: ${serverText(resultMessage)}` : ''),
    );
  }
}

export type KmipNetworkFailure = 'dns' | 'refused' | 'reset' | 'closed' | 'timeout' | 'unreachable';

/** The server could not be reached, or the connection broke or timed out: worth retrying later. */
export class KmipNetworkError extends KmipError {
  constructor(
    readonly failure: KmipNetworkFailure,
    message: string,
    readonly code?: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

/**
 * TLS failed for a reason that a retry will not fix: the server's certificate does not verify against the
 * connection's CA or name, the server refused our client certificate (a TLS alert), or no common protocol.
 */
export class KmipTlsError extends KmipError {
  constructor(
    message: string,
    readonly code?: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

/** The host resolves to an address the SSRF guard forbids (private, loopback, ... and not in DSM_ALLOW_CIDRS). */
export class KmipAddressForbiddenError extends KmipError {
  constructor(
    readonly host: string,
    readonly address: string,
  ) {
    super(`${host} resolves to ${address}, which KMIP connections may not reach (allow it with DSM_ALLOW_CIDRS)`);
  }
}

/** The server's answer is not valid TTLV, not the KMIP message expected, or there is no common KMIP version. */
export class KmipProtocolError extends KmipError {}

/** DiscoverVersions answered, but with none of the versions offered (a valid KMIP answer: the server speaks KMIP). */
export class KmipVersionMismatchError extends KmipProtocolError {
  constructor(
    readonly offered: readonly ProtocolVersion[],
    readonly answered: readonly ProtocolVersion[],
  ) {
    super(`no common KMIP version: offered ${offered.map(versionString).join(', ')}, the server answered ${answered.map(versionString).join(', ') || 'none'}`);
  }
}
