import { randomUUID } from 'node:crypto';
import type { Request, RequestHandler, Response } from 'express';
import type { Logger } from '../shared/logger.js';

export const REQUEST_ID_HEADER = 'X-Request-Id';

declare module 'http' {
  interface IncomingMessage {
    /** The request id (requestLogging): the caller's X-Request-Id when sane, else a new UUID. */
    id: string;
    /** A logger bound to the request id (`req_id`), set by requestLogging. */
    log: Logger;
  }
}

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

/** The level of a request's access line. */
function accessLevel(req: Request, res: Response, err: Error | undefined): 'error' | 'warn' | 'info' | 'debug' {
  if (err || res.statusCode >= 500) return 'error';
  if (QUIET.test(pathOf(req))) return 'debug';
  return res.statusCode >= 400 ? 'warn' : 'info';
}

/**
 * Gives every request an id (`req.id`, the `X-Request-Id` response header, `req.log` bound to `req_id`) and
 * writes one access line per request when its response finishes (or the connection closes first): method,
 * path, status, response time, req_id; `err` and the message "request failed" when the response failed
 * (a 5xx or a stream error). No headers, no bodies, no query strings are logged. (The lines pino-http wrote
 * with `quietReqLogger`/`quietResLogger`, without the child logger with the serialized request it made for
 * every request and these settings never used.)
 */
export function requestLogging(logger: Logger): RequestHandler {
  return (req, res, next) => {
    const id = requestIdFrom(req.headers['x-request-id']);
    res.setHeader(REQUEST_ID_HEADER, id);
    req.id = id;
    // The request's logger is made when first used: most requests log nothing but their access line.
    let log: Logger | undefined;
    Object.defineProperty(req, 'log', {
      configurable: true,
      enumerable: true,
      get: () => (log ??= logger.child({ req_id: id })),
      set: (value: Logger) => void (log = value),
    });
    const startedAt = Date.now();
    const finished = (err?: Error) => {
      res.removeListener('close', finished);
      res.removeListener('finish', finished);
      res.removeListener('error', finished);
      const level = accessLevel(req, res, err);
      if (!logger.isLevelEnabled(level)) return;
      const failure = err ?? (res.statusCode >= 500 ? new Error(`failed with status code ${res.statusCode}`) : undefined);
      // With req_id first, the line is the one the request's own logger would write (its binding stands there).
      const line = { req_id: id, method: req.method, path: pathOf(req), status: res.statusCode, responseTime: Date.now() - startedAt };
      if (failure) {
        logger[level]({ ...line, ...(failure.message.startsWith('failed with status code') ? {} : { err: failure.message }) }, 'request failed');
      } else {
        logger[level](line, res.writableEnded ? 'request completed' : 'request aborted');
      }
    };
    res.on('close', finished);
    res.on('finish', finished);
    res.on('error', finished);
    next();
  };
}
