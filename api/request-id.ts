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
const QUIET = /^\/(?:healthz|readyz|metrics|openapi\.json|docs(?:\/|$))/;

/** The path without the query string: queries are never logged. */
function pathOf(req: Request): string {
  return (req.originalUrl || req.url).split('?')[0] ?? '';
}

/**
 * Gives every request an id (`req.id`, the `X-Request-Id` response header, `req.log` bound to `req_id`) and
 * writes one access line per request: method, path, status, response time, req_id. No headers, no bodies,
 * no query strings are logged.
 */
export function requestLogging(logger: Logger): RequestHandler {
  const accessLine = (req: Request, res: Response, responseTime: number) => ({
    method: req.method,
    path: pathOf(req),
    status: res.statusCode,
    responseTime,
  });
  return pinoHttp<Request, Response>({
    logger,
    // Access lines hold scalars only (method, path, status, responseTime, req_id, an error message), so only
    // the top-level redaction paths can match them; the others would make pino copy every line. The request and
    // response objects are never serialized (pino-http binds the request to a logger of its own, unused here).
    redact: { paths: topLevelRedactPaths, censor: REDACTED },
    wrapSerializers: false,
    serializers: { req: () => undefined, res: () => undefined },
    quietReqLogger: true,
    quietResLogger: true,
    customAttributeKeys: { reqId: 'req_id' },
    genReqId: (req, res) => {
      const id = requestIdFrom(req.headers['x-request-id']);
      res.setHeader(REQUEST_ID_HEADER, id);
      // The request's logger for handlers, with every redaction path (pino-http keeps a req.log or res.log already set).
      req.log = logger.child({ req_id: id });
      res.log = req.log;
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
