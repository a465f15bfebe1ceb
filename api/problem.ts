import { randomUUID } from 'node:crypto';
import { STATUS_CODES } from 'node:http';
import type { Duplex } from 'node:stream';
import type { ErrorRequestHandler, Response } from 'express';
import { AppError, UnavailableError, type FieldError } from '../shared/errors.js';
import { requestLogger } from './request-id.js';
import type { Logger } from '../shared/logger.js';

export const PROBLEM_TYPE = 'application/problem+json';

export interface Problem {
  type: string;
  title: string;
  status: number;
  detail: string;
  code: string;
  instance?: string;
  errors?: FieldError[];
  /** The request's `X-Request-Id`, to quote when reporting a problem. */
  request_id?: string;
  [ext: string]: unknown;
}

const TITLES: Record<number, string> = {
  400: 'Bad Request',
  401: 'Unauthorized',
  404: 'Not Found',
  405: 'Method Not Allowed',
  408: 'Request Timeout',
  409: 'Conflict',
  413: 'Content Too Large',
  415: 'Unsupported Media Type',
  422: 'Unprocessable Content',
  429: 'Too Many Requests',
  431: 'Request Header Fields Too Large',
  500: 'Internal Server Error',
  502: 'Bad Gateway',
  503: 'Service Unavailable',
};

export function problem(status: number, code: string, detail: string, extra: Partial<Problem> = {}): Problem {
  return { type: `urn:keyferry:problem:${code}`, title: TITLES[status] ?? 'Error', status, detail, code, ...extra };
}

export function sendProblem(res: Response, p: Problem): void {
  const requestId = res.getHeader('X-Request-Id');
  if (typeof requestId === 'string') p = { ...p, request_id: requestId };
  if (p.status === 401) res.setHeader('WWW-Authenticate', 'Bearer');
  if (p.status === 503) res.setHeader('Retry-After', '5');
  res.status(p.status).type(PROBLEM_TYPE).send(JSON.stringify(p));
}

/** Errors a client caused, as thrown by express's body parser. */
interface HttpError {
  status?: number;
  statusCode?: number;
  type?: string;
  expose?: boolean;
}

/** True when ioredis cannot reach Redis: the store is away, the request may be retried. */
function isRedisAway(err: Error): boolean {
  return err.name === 'MaxRetriesPerRequestError' || /Connection is closed|ECONNREFUSED|Stream isn't writeable|enableOfflineQueue/.test(err.message);
}

/**
 * True when Redis answers that it cannot serve now: a Redis Cluster with a slot that has no node (`CLUSTERDOWN`,
 * which ioredis retries until its redirections run out), a slot being moved (`TRYAGAIN`), a node loading its
 * data (`LOADING`), a replica asked to write during a failover (`READONLY`) or without its master
 * (`MASTERDOWN`), also when Redis refused the commands of a MULTI for these reasons and then its EXEC
 * (`EXECABORT`, with the refusals as ioredis's `previousErrors`). These pass, but the same answers also come from
 * a setup that is wrong for good (`REDIS_URL` naming a replica, say), so each one is logged.
 */
export function isRedisRefusing(err: Error & { previousErrors?: Error[] }): boolean {
  if (err.message.startsWith('EXECABORT ')) return (err.previousErrors ?? []).length > 0 && (err.previousErrors ?? []).every(isRedisRefusing);
  return /Too many Cluster redirections/.test(err.message) || /^(CLUSTERDOWN|TRYAGAIN|LOADING|READONLY|MASTERDOWN) /.test(err.message);
}

/** The one mapping from thrown errors to problem+json. A client's mistake is never a 500. */
export function problemHandler(logger: Logger): ErrorRequestHandler {
  return (err: unknown, req, res, _next) => {
    const instance = req.originalUrl;
    if (res.headersSent) {
      // A stream (SSE) that already started cannot turn into a problem: end it.
      requestLogger(req, logger).warn({ err: (err as Error).message, path: req.path }, 'error after the response started');
      res.end();
      return;
    }
    if (err instanceof AppError) {
      if (err instanceof UnavailableError && err.cause !== undefined) {
        // fetch's failures keep the reason (ECONNREFUSED, ENOTFOUND, …) in their own cause.
        const inner = (err.cause as { cause?: { code?: unknown } } | undefined)?.cause?.code;
        const cause = `${err.cause instanceof Error ? `${err.cause.name}: ${err.cause.message}` : String(err.cause)}${typeof inner === 'string' ? ` (${inner})` : ''}`;
        requestLogger(req, logger).warn({ err: cause, path: req.path }, err.message);
      }
      sendProblem(res, problem(err.status, err.code, err.message, { instance, ...(err.errors ? { errors: err.errors } : {}) }));
      return;
    }
    const e = err as Error & HttpError & { previousErrors?: Error[] };
    const status = e.status ?? e.statusCode;
    if (e.type === 'entity.parse.failed') {
      sendProblem(res, problem(400, 'malformed_json', 'The body is not valid JSON.', { instance, errors: [{ path: '(body)', message: 'Malformed JSON.' }] }));
    } else if (e.type === 'entity.too.large') {
      sendProblem(res, problem(413, 'body_too_large', 'The body exceeds the size limit.', { instance }));
    } else if (status && status >= 400 && status < 500 && e.expose !== false) {
      sendProblem(res, problem(status, 'bad_request', e.message, { instance }));
    } else if (err instanceof UnavailableError || (err instanceof Error && (isRedisAway(err) || isRedisRefusing(err)))) {
      if (!(err instanceof UnavailableError) && isRedisRefusing(e)) {
        const previous = e.previousErrors?.map((p) => p.message);
        requestLogger(req, logger).warn({ err: e.message, ...(previous ? { previous } : {}), path: req.path }, 'redis refused the request for now');
      }
      const u = new UnavailableError();
      sendProblem(res, problem(u.status, u.code, u.message, { instance }));
    } else {
      requestLogger(req, logger).error({ err, path: req.path }, 'unhandled error');
      sendProblem(res, problem(500, 'internal_error', 'An unexpected error occurred.', { instance }));
    }
  };
}

/**
 * Node's `clientError`: a request its HTTP parser refused (headers over 16 KiB, a malformed request line,
 * a timeout) never reaches Express; it is answered here as a problem too, then the connection closes.
 */
export function answerClientError(err: Error & { code?: string }, socket: Duplex): void {
  if (err.code === 'ECONNRESET' || !socket.writable) return void socket.destroy();
  const [status, code, detail] =
    err.code === 'HPE_HEADER_OVERFLOW'
      ? [431, 'headers_too_large', 'The request line and headers exceed the size limit (16 KiB).']
      : err.code === 'ERR_HTTP_REQUEST_TIMEOUT'
        ? [408, 'request_timeout', 'The request was not received in time.']
        : [400, 'malformed_request', 'The request is not valid HTTP/1.1.'];
  // The request was never parsed, so its X-Request-Id is unknown: the answer gets a fresh id.
  const requestId = randomUUID();
  const body = JSON.stringify(problem(status, code, detail, { request_id: requestId }));
  socket.end(
    `HTTP/1.1 ${status} ${STATUS_CODES[status]}\r\nContent-Type: ${PROBLEM_TYPE}\r\nX-Request-Id: ${requestId}\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`,
  );
}
