/** HTTP status codes of the KMS errors that are not client errors (400). */
const SERVER_ERROR_STATUS: Record<string, number> = {
  KMSInternalException: 500,
  DependencyTimeoutException: 503,
};

/** An error the emulator returns to the client as an AWS JSON 1.1 error response. */
export class KmsError extends Error {
  constructor(
    readonly type: string,
    message: string,
    readonly status: number = SERVER_ERROR_STATUS[type] ?? 400,
  ) {
    super(message);
    this.name = type;
  }
}

export function validationError(message: string): KmsError {
  return new KmsError('ValidationException', message);
}

export function notFound(message: string): KmsError {
  return new KmsError('NotFoundException', message);
}

export function invalidState(message: string): KmsError {
  return new KmsError('KMSInvalidStateException', message);
}
