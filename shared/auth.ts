import { SignJWT, jwtVerify } from 'jose';
import { UnauthorizedError } from './errors.js';

export interface AuthOptions {
  secret: string;
  issuer?: string | undefined;
  audience?: string | undefined;
}

export interface Principal {
  account: string;
  subject: string | undefined;
  groups: string[];
}

/** Verifies an HS256 bearer token; the account is the `acc` claim, as in CCKM's tokens. */
export async function verifyToken(token: string, opts: AuthOptions): Promise<Principal> {
  try {
    const { payload } = await jwtVerify(token, new TextEncoder().encode(opts.secret), {
      algorithms: ['HS256'],
      requiredClaims: ['exp'],
      ...(opts.issuer ? { issuer: opts.issuer } : {}),
      ...(opts.audience ? { audience: opts.audience } : {}),
    });
    if (typeof payload.acc !== 'string' || payload.acc.length === 0) throw new Error('no acc claim');
    const cust = payload.cust as { groups?: unknown } | undefined;
    const groups = Array.isArray(cust?.groups) ? cust.groups.filter((g): g is string => typeof g === 'string') : [];
    return { account: payload.acc, subject: payload.sub, groups };
  } catch {
    throw new UnauthorizedError('The bearer token is missing, malformed, expired or not signed by this service.');
  }
}

export async function signToken(
  opts: AuthOptions & { account: string; subject?: string; ttlSeconds?: number; groups?: string[] },
): Promise<string> {
  let jwt = new SignJWT({ acc: opts.account, cust: { groups: opts.groups ?? ['admin'] } })
    .setProtectedHeader({ alg: 'HS256', typ: 'JWT' })
    .setSubject(opts.subject ?? `local|${opts.account}`)
    .setIssuedAt()
    .setExpirationTime(Math.floor(Date.now() / 1000) + (opts.ttlSeconds ?? 3600));
  if (opts.issuer) jwt = jwt.setIssuer(opts.issuer);
  if (opts.audience) jwt = jwt.setAudience(opts.audience);
  return jwt.sign(new TextEncoder().encode(opts.secret));
}
