import { nameOf, resultReasonName, ResultStatus } from './tags.js';

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
        (resultMessage ? `: ${resultMessage.slice(0, 300)}` : ''),
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
