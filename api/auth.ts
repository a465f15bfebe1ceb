import type { RequestHandler } from 'express';
import { verifyTokenCached, type AuthOptions, type Principal } from '../shared/auth.js';
import { UnauthorizedError } from '../shared/errors.js';

declare module 'express-serve-static-core' {
  interface Request {
    principal?: Principal;
  }
}

export function requireAuth(opts: AuthOptions): RequestHandler {
  return async (req, _res, next) => {
    const header = req.get('authorization') ?? '';
    const match = /^Bearer ([A-Za-z0-9_.-]+)$/.exec(header);
    if (!match?.[1]) throw new UnauthorizedError();
    req.principal = await verifyTokenCached(match[1], opts);
    next();
  };
}

/** The caller's account; only routes behind requireAuth call it. */
export function accountOf(req: { principal?: Principal }): string {
  if (!req.principal) throw new UnauthorizedError();
  return req.principal.account;
}
