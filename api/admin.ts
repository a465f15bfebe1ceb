import { createBullBoard } from '@bull-board/api';
import { BullMQAdapter } from '@bull-board/api/bullMQAdapter';
import { ExpressAdapter } from '@bull-board/express';
import type { Queue } from 'bullmq';
import express, { Router, type Request, type RequestHandler } from 'express';
import { decodeJwt } from 'jose';
import { isAdmin, verifyToken, type AuthOptions, type Principal } from '../shared/auth.js';
import type { Config } from '../shared/config.js';
import { UnauthorizedError, UnavailableError } from '../shared/errors.js';
import type { WebhookJobData } from '../shared/webhooks.js';
import { problem, sendProblem } from './problem.js';

/*
 * The operators' queue dashboard: bull-board at /admin/queues, over the upload and the webhook queue.
 *
 * Access: a token of the `admin` group (cust.groups), from an `Authorization: Bearer` header or from the
 * admin cookie that POST /admin/login sets (a browser cannot send a header when it navigates). The cookie is
 * read here only, never by the tenant API under /api, and is HttpOnly, SameSite=Strict, Path=/admin, Secure
 * on https, and expires with its token. Every unsafe request under /admin without a bearer header (so the
 * login, the logout and the dashboard's actions) must come from this origin (Sec-Fetch-Site, else Origin),
 * on top of SameSite=Strict, which does not separate sibling subdomains.
 *
 * The dashboard shows every tenant's queued jobs: upload jobs hold ids only ({jobId, account}); webhook jobs
 * are shown with their URL cut to its origin and without their body (a tenant's callback URL may carry a
 * credential in its query). Read-only unless ADMIN_READ_ONLY=false.
 */

export const ADMIN_COOKIE = 'keyferry_admin';
const COOKIE_PATH = '/admin';
export const DASHBOARD_PATH = '/admin/queues';
const TOKEN_RE = /^[A-Za-z0-9_.-]+$/;
const UNSAFE_METHODS = new Set(['POST', 'PUT', 'PATCH', 'DELETE']);

/** The login page and the dashboard: no framing, nothing from elsewhere (bull-board's web font stays out). */
const CSP = [
  "default-src 'self'",
  "script-src 'self'",
  "style-src 'self' 'unsafe-inline'",
  "img-src 'self' data:",
  "connect-src 'self'",
  "font-src 'self'",
  "form-action 'self'",
  "frame-ancestors 'none'",
  "base-uri 'self'",
  "object-src 'none'",
].join('; ');

export interface AdminDeps {
  config: Pick<Config, 'ADMIN_READ_ONLY' | 'ADMIN_GROUP'>;
  auth: AuthOptions;
  uploadQueue: Queue;
  /** Made on the first dashboard request (the API has no other use for a webhook Queue of its own). */
  webhookQueue: () => Queue;
}

/** The admin routes: GET/POST /admin/login, POST /admin/logout, and the dashboard under /admin/queues. */
export function adminRoutes(deps: AdminDeps): Router {
  const router = Router();
  router.use(COOKIE_PATH, adminHeaders);
  router.use(COOKIE_PATH, sameOriginForUnsafe);
  router.get('/admin/login', loginPage(deps.auth, deps.config.ADMIN_GROUP));
  router.post('/admin/login', express.urlencoded({ extended: false, limit: '16kb', parameterLimit: 5 }), login(deps.auth, deps.config.ADMIN_GROUP));
  router.post('/admin/logout', (req, res) => {
    res.clearCookie(ADMIN_COOKIE, cookieOptions(req));
    res.redirect(303, '/admin/login');
  });
  router.use(DASHBOARD_PATH, requireAdmin(deps.auth, deps.config.ADMIN_GROUP), dashboard(deps));
  return router;
}

// ---- the checks ---------------------------------------------------------------------------------------

const adminHeaders: RequestHandler = (req, res, next) => {
  res.setHeader('Content-Security-Policy', CSP);
  res.setHeader('X-Frame-Options', 'DENY');
  res.setHeader('Referrer-Policy', 'no-referrer');
  res.setHeader('X-Content-Type-Options', 'nosniff');
  // Every tenant's jobs: never kept by a cache. bull-board's hashed static files may be.
  if (!req.path.startsWith('/queues/static/')) res.setHeader('Cache-Control', 'no-store');
  next();
};

/**
 * Cross-site request forgery: an unsafe request that could ride on the cookie must come from a page of this
 * origin. Browsers say so in Sec-Fetch-Site (set by the browser, not the page, and unaffected by a proxy
 * rewriting Host); older ones send Origin, compared with the Host the request was sent to. A request with
 * neither is refused: only a browser sends the cookie, and a script sends a bearer header instead.
 */
const sameOriginForUnsafe: RequestHandler = (req, res, next) => {
  if (!UNSAFE_METHODS.has(req.method) || req.get('authorization') !== undefined) return next();
  if (isSameOrigin(req)) return next();
  sendProblem(
    res,
    problem(403, 'cross_origin_refused', 'An unsafe request under /admin must come from a page of this origin (or carry a bearer token).', {
      title: 'Forbidden',
      instance: req.originalUrl,
    }),
  );
};

function isSameOrigin(req: Request): boolean {
  const site = req.get('sec-fetch-site');
  if (site !== undefined) return site === 'same-origin';
  const origin = req.get('origin');
  if (origin === undefined || origin === 'null') return false;
  try {
    return new URL(origin).host === req.get('host');
  } catch {
    return false;
  }
}

/** The bearer header if there is one (malformed: 401, no fallback), else the admin cookie. */
function tokenOf(req: Request): { token: string; from: 'header' | 'cookie' } | undefined {
  const header = req.get('authorization');
  if (header !== undefined) {
    const match = /^Bearer ([A-Za-z0-9_.-]+)$/.exec(header);
    if (!match?.[1]) throw new UnauthorizedError();
    return { token: match[1], from: 'header' };
  }
  const cookie = readCookie(req, ADMIN_COOKIE);
  return cookie !== undefined && TOKEN_RE.test(cookie) ? { token: cookie, from: 'cookie' } : undefined;
}

function readCookie(req: Request, name: string): string | undefined {
  for (const part of (req.get('cookie') ?? '').split(';')) {
    const eq = part.indexOf('=');
    if (eq > 0 && part.slice(0, eq).trim() === name) return part.slice(eq + 1).trim();
  }
  return undefined;
}

function requireAdmin(auth: AuthOptions, group: string): RequestHandler {
  return async (req, res, next) => {
    const found = tokenOf(req);
    if (!found) {
      return sendProblem(
        res,
        problem(401, 'unauthorized', `Send a token of the admin group as a bearer header, or log in at /admin/login.`, { instance: req.originalUrl }),
      );
    }
    let principal: Principal;
    try {
      principal = await verifyToken(found.token, auth);
    } catch (err) {
      // An expired or otherwise dead cookie is dropped, so the next visit starts clean (not when the keys that
      // would verify it could not be fetched: 503).
      if (found.from === 'cookie' && !(err instanceof UnavailableError)) res.clearCookie(ADMIN_COOKIE, cookieOptions(req));
      throw err;
    }
    if (!isAdmin(principal, group)) return sendProblem(res, notAdmin(req, group));
    req.principal = principal;
    next();
  };
}

const notAdmin = (req: Request, group: string) =>
  problem(403, 'forbidden', `The token is valid but not in the group ${group} (cust.groups; ADMIN_GROUP), which opens the dashboard.`, { title: 'Forbidden', instance: req.originalUrl });

/** HttpOnly, SameSite=Strict, Path=/admin; Secure when the page is on https (here, or at a TLS proxy: Origin). */
function cookieOptions(req: Request): express.CookieOptions {
  const secure = req.secure || (req.get('origin') ?? '').startsWith('https:');
  return { httpOnly: true, sameSite: 'strict', secure, path: COOKIE_PATH };
}

// ---- login --------------------------------------------------------------------------------------------

function login(auth: AuthOptions, group: string): RequestHandler {
  return async (req, res) => {
    const body = req.body as { token?: unknown } | undefined;
    const token = typeof body?.token === 'string' ? body.token.trim() : '';
    const refuse = (status: 401 | 403 | 503, p: ReturnType<typeof problem>) => {
      if (req.accepts(['json', 'html']) === 'html') {
        if (status === 503) res.setHeader('Retry-After', '5');
        return void res.status(status).type('html').send(loginHtml({ error: p.detail }));
      }
      sendProblem(res, p);
    };
    let principal: Principal;
    try {
      if (!TOKEN_RE.test(token)) throw new UnauthorizedError('Paste a bearer token (a JWT).');
      principal = await verifyToken(token, auth);
    } catch (err) {
      if (err instanceof UnavailableError) return refuse(503, problem(503, err.code, err.message, { instance: req.originalUrl }));
      const detail = err instanceof UnauthorizedError ? err.message : 'The token could not be verified.';
      return refuse(401, problem(401, 'unauthorized', detail, { instance: req.originalUrl }));
    }
    if (!isAdmin(principal, group)) return refuse(403, notAdmin(req, group));
    const exp = decodeJwt(token).exp as number; // verifyToken requires exp
    res.cookie(ADMIN_COOKIE, token, { ...cookieOptions(req), expires: new Date(exp * 1000) });
    res.redirect(303, DASHBOARD_PATH);
  };
}

function loginPage(auth: AuthOptions, group: string): RequestHandler {
  return async (req, res) => {
    const cookie = readCookie(req, ADMIN_COOKIE);
    let session: { who: string; until: string } | undefined;
    if (cookie !== undefined && TOKEN_RE.test(cookie)) {
      const principal = await verifyToken(cookie, auth).catch(() => undefined);
      if (principal && isAdmin(principal, group)) {
        const exp = decodeJwt(cookie).exp as number;
        session = { who: principal.subject ?? principal.account, until: new Date(exp * 1000).toISOString() };
      }
    }
    res.type('html').send(loginHtml({ session }));
  };
}

const escapeHtml = (s: string) => s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function loginHtml(opts: { error?: string; session?: { who: string; until: string } | undefined }): string {
  const session = opts.session
    ? `<p class="ok">Logged in as <b>${escapeHtml(opts.session.who)}</b> until ${escapeHtml(opts.session.until)}.
  <a href="${DASHBOARD_PATH}/">Open the queue dashboard</a></p>
<form method="post" action="/admin/logout"><button type="submit">Log out</button></form>`
    : '';
  const error = opts.error ? `<p class="error" role="alert">${escapeHtml(opts.error)}</p>` : '';
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>keyferry admin login</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 40rem; margin: 3rem auto; padding: 0 1rem; }
textarea { width: 100%; font-family: monospace; }
.error { color: #a00; } .ok { color: #060; }
</style>
</head>
<body>
<h1>keyferry queue dashboard</h1>
${session}${error}
<form method="post" action="/admin/login">
<p><label for="token">Paste a bearer token of the <code>admin</code> group (<code>npm run token -- --account NAME --admin</code>):</label></p>
<p><textarea id="token" name="token" rows="6" required autocomplete="off" spellcheck="false"></textarea></p>
<p><button type="submit">Log in</button></p>
</form>
<p>The token is kept in an HttpOnly cookie for /admin only, until the token expires.</p>
</body>
</html>
`;
}

// ---- the dashboard ------------------------------------------------------------------------------------

/**
 * A webhook job as the dashboard shows it: the URL cut to its origin (paths and queries of callback URLs may
 * carry a tenant's credential, as Slack-style URLs do), the signed body left out.
 */
export function webhookDataForDashboard(data: WebhookJobData): Record<string, unknown> {
  let url = '(invalid URL)';
  try {
    const u = new URL(data.url);
    url = `${u.origin}${u.pathname === '/' && !u.search ? '/' : '/…'}`;
  } catch {
    /* shown as invalid */
  }
  return {
    msgId: data.msgId,
    type: data.type,
    account: data.account,
    ownerId: data.ownerId,
    url,
    body: `(${Buffer.byteLength(data.body ?? '')} bytes, not shown)`,
  };
}

/**
 * bull-board's own Express app (page, static files, its /api), built on the first request that passed the
 * check, and run as a plain handler: what it does not answer goes on to the app's 404.
 */
function dashboard(deps: AdminDeps): RequestHandler {
  let board: RequestHandler | undefined;
  const build = (): RequestHandler => {
    const readOnlyMode = deps.config.ADMIN_READ_ONLY;
    const upload = new BullMQAdapter(deps.uploadQueue, { readOnlyMode, description: 'Upload jobs: { jobId, account } only; the job record holds the rest.' });
    const webhooks = new BullMQAdapter(deps.webhookQueue(), { readOnlyMode, description: 'Webhook deliveries (URL cut to its origin, body not shown).' });
    webhooks.setFormatter('data', (data: WebhookJobData) => webhookDataForDashboard(data));
    const adapter = new ExpressAdapter();
    adapter.setBasePath(DASHBOARD_PATH);
    createBullBoard({
      queues: [upload, webhooks],
      // @bull-board/express 9.10.1 declares its adapter against its own copy of @bull-board/api (9.10.1),
      // whose BaseAdapter is a different declaration from 9.10.2's; at runtime it only calls their methods.
      serverAdapter: adapter as unknown as Parameters<typeof createBullBoard>[0]['serverAdapter'],
      options: {
        uiConfig: {
          boardTitle: readOnlyMode ? 'keyferry, read-only' : 'keyferry',
          hideDocsLink: true,
          miscLinks: [{ text: 'Log out', url: '/admin/login' }],
        },
      },
    });
    const app = adapter.getRouter() as express.Express;
    app.disable('x-powered-by');
    return app;
  };
  return (req, res, next) => {
    board ??= build();
    // bull-board's app swaps the request's and response's prototypes for its own; put ours back after.
    const reqProto = Object.getPrototypeOf(req) as object;
    const resProto = Object.getPrototypeOf(res) as object;
    board(req, res, (err?: unknown) => {
      Object.setPrototypeOf(req, reqProto);
      Object.setPrototypeOf(res, resProto);
      next(err);
    });
  };
}
