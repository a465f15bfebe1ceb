import { randomUUID } from 'node:crypto';
import type { Request, RequestHandler, Response } from 'express';
import { pinoHttp } from 'pino-http';
import { REDACTED, topLevelRedactPaths, type Logger } from '../shared/logger.js';

export const REQUEST_ID_HEADER = 'X-Request-Id';

/** An incoming request id is reused only when it is a plain token; anything else gets a fresh UUID. */
const SANE_REQUEST_ID = /^[A-Za-z0-9._:-]{1,128}$/;

/** The caller's `X-Request-Id` when sane, else a new UUID. */
export function requestIdFrom(header: string | string[] | undefined): string {
  return typeof header === 'string' && SANE_REQUEST_ID.test(header) ? header : randomUUID();
}

/** Operational endpoints (probes, scrapes, API docs): their access lines are logged at debug only. */
export const QUIET = /^\/(?:healthz|readyz|metrics|openapi\.json|docs(?:\/|$))/;

/** The path without the query string: queries are never logged. */
function pathOf(req: Request): string {
  return (req.originalUrl || req.url).split('?')[0] ?? '';
}

/**
 * The logger for a line about a request: the service's logger (every redaction path) bound to the request's
 * `req_id`, made when called. (A child logger made for every request, whether or not it logged, cost about 8 %
 * of an accepted upload's instructions, and most requests log nothing but their access line.)
 */
export function requestLogger(req: Request, logger: Logger): Logger {
  return typeof req.id === 'string' ? logger.child({ req_id: req.id }) : logger;
}

/**
 * Gives every request an id (`req.id`, the `X-Request-Id` response header) and writes one access line per
 * request: req_id, method, path, status, response time. No headers, no bodies, no query strings are logged.
 * `req.log` and `res.log` are the service's logger itself, with every redaction path, bound to nothing: a
 * handler logs about its request through requestLogger(req, logger), which adds the req_id.
 */
export function requestLogging(logger: Logger): RequestHandler {
  const accessLine = (req: Request, res: Response, responseTime: number) => ({
    req_id: req.id,
    method: req.method,
    path: pathOf(req),
    status: res.statusCode,
    responseTime,
  });
  return pinoHttp<Request, Response>({
    logger,
    // Access lines hold scalars only (req_id, method, path, status, responseTime, an error message), so only
    // the top-level redaction paths can match them; the others would make pino copy every line. The request and
    // response objects are never serialized (pino-http binds the request to a logger of its own, unused here).
    // The access line is written by pino-http's logger itself (quietResLogger), which binds nothing: no
    // per-request child but the one pino-http always makes.
    redact: { paths: topLevelRedactPaths, censor: REDACTED },
    wrapSerializers: false,
    serializers: { req: () => undefined, res: () => undefined },
    quietResLogger: true,
    genReqId: (req, res) => {
      const id = requestIdFrom(req.headers['x-request-id']);
      res.setHeader(REQUEST_ID_HEADER, id);
      // The logger for handlers, with every redaction path (pino-http keeps a req.log or res.log already set).
      req.log = logger;
      res.log = logger;
      return id;
    },
    customLogLevel: (req, res, err) => {
      if (err || res.statusCode >= 500) return 'error';
      if (QUIET.test(pathOf(req))) return 'debug';
      return res.statusCode >= 400 ? 'warn' : 'info';
    },
    customSuccessObject: (req, res, val: { responseTime: number }) => accessLine(req, res, val.responseTime),
    customErrorObject: (req, res, error, val: { responseTime: number }) => ({
      ...accessLine(req, res, val.responseTime),
      ...(error.message.startsWith('failed with status code') ? {} : { err: error.message }),
    }),
    customSuccessMessage: (req, res) => (res.writableEnded ? 'request completed' : 'request aborted'),
    customErrorMessage: () => 'request failed',
  }) as unknown as RequestHandler;
}
