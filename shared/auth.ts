import { SignJWT, createRemoteJWKSet, errors as joseErrors, jwtVerify, type JWTVerifyGetKey } from 'jose';
import type { Config } from './config.js';
import { UnauthorizedError, UnavailableError } from './errors.js';

/** The asymmetric algorithms a JWK set may verify; HS256 is only ever checked against JWT_SECRET. */
const JWKS_ALGORITHMS = ['RS256', 'ES256'];

export interface AuthOptions {
  secret: string;
  issuer?: string | undefined;
  audience?: string | undefined;
  /** Keys of RS256/ES256 tokens (JWT_JWKS_URL); without it only HS256 tokens are accepted. */
  jwks?: JWTVerifyGetKey | undefined;
}

export interface Principal {
  account: string;
  subject: string | undefined;
  groups: string[];
}

/** The API's verification settings; the JWK set, if any, is fetched on first use and cached. */
export function authOptions(config: Pick<Config, 'JWT_SECRET' | 'JWT_ISSUER' | 'JWT_AUDIENCE' | 'JWT_JWKS_URL'>): AuthOptions {
  return {
    secret: config.JWT_SECRET,
    issuer: config.JWT_ISSUER,
    audience: config.JWT_AUDIENCE,
    jwks: config.JWT_JWKS_URL ? createRemoteJWKSet(new URL(config.JWT_JWKS_URL)) : undefined,
  };
}

/**
 * Verifies a bearer token: HS256 with JWT_SECRET, or RS256/ES256 with a key of the JWK set when one is
 * configured. The key follows from the algorithm, so an HS256 token "signed" with a public key of the set
 * is checked against JWT_SECRET and fails. The account is the `acc` claim, as in CCKM's tokens.
 */
export async function verifyToken(token: string, opts: AuthOptions): Promise<Principal> {
  return (await verify(token, opts)).principal;
}

/** How long a verified token is taken as verified without checking it again (at most until it expires). */
const VERIFIED_FOR_MS = 60_000;
/** Verified tokens remembered per verification settings; the least recently used go first. */
const VERIFIED_MAX = 1000;
const verifiedTokens = new WeakMap<AuthOptions, Map<string, { principal: Principal; until: number }>>();

/**
 * verifyToken for the API's bearer tokens, remembering the tokens it verified (per `opts`, at most
 * VERIFIED_MAX): a token verified less than VERIFIED_FOR_MS ago, and not expired since, is not checked again.
 * Failures are never remembered. Each call gets a principal of its own.
 */
export async function verifyTokenCached(token: string, opts: AuthOptions): Promise<Principal> {
  let verified = verifiedTokens.get(opts);
  if (!verified) verifiedTokens.set(opts, (verified = new Map()));
  const hit = verified.get(token);
  if (hit) {
    verified.delete(token);
    if (hit.until > Date.now()) {
      verified.set(token, hit); // now the most recently used
      return { ...hit.principal, groups: [...hit.principal.groups] };
    }
  }
  const { principal, exp } = await verify(token, opts);
  // exp is in seconds; the token is valid while the clock is before it (as jose checks it).
  verified.set(token, { principal: { ...principal, groups: [...principal.groups] }, until: Math.min(exp * 1000, Date.now() + VERIFIED_FOR_MS) });
  if (verified.size > VERIFIED_MAX) verified.delete(verified.keys().next().value as string);
  return principal;
}

/** The JWK set could not be had: not the token's fault, so the request answers 503, not 401. */
class KeySetUnavailable extends Error {}

/**
 * Whether the JWK set's getter failed for want of the set (JWT_JWKS_URL refused, timed out, answered other than
 * 200, or with what is not a JWK set), not for the token (no key or several keys of the set match its header).
 * fetch's own failures are not jose's errors; jose's base JOSEError is the not-200 and not-JSON answers.
 */
export function keySetUnavailable(err: unknown): boolean {
  if (err instanceof joseErrors.JWKSTimeout || err instanceof joseErrors.JWKSInvalid) return true;
  // WebCrypto refusing to import the key of the set the token names (its key_ops, a bad point): that key is
  // unusable, the set was had. fetch's own timeouts are JWKSTimeout by now.
  if (err instanceof DOMException) return false;
  return !(err instanceof joseErrors.JOSEError) || err.constructor === joseErrors.JOSEError;
}

/** verifyToken, with the token's `exp` (seconds; required). */
async function verify(token: string, opts: AuthOptions): Promise<{ principal: Principal; exp: number }> {
  const secret = new TextEncoder().encode(opts.secret);
  const claims = {
    requiredClaims: ['exp'],
    ...(opts.issuer ? { issuer: opts.issuer } : {}),
    ...(opts.audience ? { audience: opts.audience } : {}),
  };
  const { jwks } = opts;
  try {
    const { payload } = jwks
      ? await jwtVerify(
          token,
          async (header, input) => {
            if (header.alg === 'HS256') return secret;
            try {
              return await jwks(header, input);
            } catch (err) {
              throw keySetUnavailable(err) ? new KeySetUnavailable('JWK set unavailable', { cause: err }) : err;
            }
          },
          { algorithms: ['HS256', ...JWKS_ALGORITHMS], ...claims },
        )
      : await jwtVerify(token, secret, { algorithms: ['HS256'], ...claims });
    if (typeof payload.acc !== 'string' || payload.acc.length === 0) throw new Error('no acc claim');
    const cust = payload.cust as { groups?: unknown } | undefined;
    const groups = Array.isArray(cust?.groups) ? cust.groups.filter((g): g is string => typeof g === 'string') : [];
    return { principal: { account: payload.acc, subject: payload.sub, groups }, exp: payload.exp as number };
  } catch (err) {
    if (err instanceof KeySetUnavailable) {
      throw new UnavailableError('The keys that verify RS256 and ES256 tokens (JWT_JWKS_URL) could not be fetched; try again shortly.', err.cause);
    }
    throw new UnauthorizedError('The bearer token is missing, malformed, expired or not signed by a trusted key.');
  }
}

/** The default group (`cust.groups` claim) that may open the operators' queue dashboard under /admin (ADMIN_GROUP). */
export const ADMIN_GROUP = 'admin';

/** True when the principal belongs to the operators' group. */
export function isAdmin(principal: Principal, group: string = ADMIN_GROUP): boolean {
  return principal.groups.includes(group);
}

/** Signs an HS256 token. It names no group unless asked: an admin token must be asked for explicitly. */
export async function signToken(
  opts: Omit<AuthOptions, 'jwks'> & { account: string; subject?: string; ttlSeconds?: number; groups?: string[] },
): Promise<string> {
  let jwt = new SignJWT({ acc: opts.account, cust: { groups: opts.groups ?? [] } })
    .setProtectedHeader({ alg: 'HS256', typ: 'JWT' })
    .setSubject(opts.subject ?? `local|${opts.account}`)
    .setIssuedAt()
    .setExpirationTime(Math.floor(Date.now() / 1000) + (opts.ttlSeconds ?? 3600));
  if (opts.issuer) jwt = jwt.setIssuer(opts.issuer);
  if (opts.audience) jwt = jwt.setAudience(opts.audience);
  return jwt.sign(new TextEncoder().encode(opts.secret));
}
