/**
 * The one error hierarchy. The API maps AppError subclasses to problem+json once (api/problem.ts);
 * the worker maps PipelineError to retry-or-fail once (worker/classify.ts).
 */
export interface FieldError {
  path: string;
  message: string;
}

export class AppError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly errors?: FieldError[],
  ) {
    super(message);
    this.name = new.target.name;
  }
}

export class ValidationError extends AppError {
  constructor(errors: FieldError[], message = 'The request is not valid.') {
    super(400, 'validation_failed', message, errors);
  }
}

export class UnauthorizedError extends AppError {
  constructor(message = 'A valid bearer token is required.') {
    super(401, 'unauthorized', message);
  }
}

export class NotFoundError extends AppError {
  constructor(what: string) {
    super(404, 'not_found', `${what} was not found.`);
  }
}

export class ConflictError extends AppError {
  constructor(code: string, message: string) {
    super(409, code, message);
  }
}

export class UnprocessableError extends AppError {
  constructor(code: string, message: string, errors?: FieldError[]) {
    super(422, code, message, errors);
  }
}

export class UnavailableError extends AppError {
  constructor(message = 'A backing service is unavailable; try again shortly.', cause?: unknown) {
    super(503, 'service_unavailable', message);
    // Logged by the API's problem handler, never sent.
    if (cause !== undefined) this.cause = cause;
  }
}

/** A failure inside the upload pipeline, with the stable code clients see in `error.code`. */
export class PipelineError extends Error {
  constructor(
    readonly code: string,
    message: string,
    readonly retryable: boolean,
  ) {
    super(message);
    this.name = 'PipelineError';
  }
}

/** Turns whatever was thrown into an Error (graphile-worker's coerceError). */
export function coerceError(err: unknown): Error {
  return err instanceof Error ? err : new Error(typeof err === 'string' ? err : JSON.stringify(err));
}
