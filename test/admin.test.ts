import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ADMIN_COOKIE } from '../api/admin.js';
import { signToken, verifyToken } from '../shared/auth.js';
import { Receiver } from './helpers/receiver.js';
import { seedKms, seedLocalKey, startStack, waitForJob, type TestStack } from './helpers/stack.js';

const example = JSON.parse(readFileSync(new URL('./fixtures/spec-example-request.json', import.meta.url), 'utf8')) as Record<string, unknown>;

let stack: TestStack;
let receiver: Receiver;
let tenant: string;
let admin: string;
let origin: string;

const adminToken = (s: TestStack, ttlSeconds = 600) => signToken({ secret: s.config.JWT_SECRET, account: 'ops', subject: 'alice@ops', ttlSeconds, groups: ['admin'] });

/** A request to the stack with nothing added (no redirects followed, no JSON encoding). */
function raw(path: string, init: RequestInit & { headers?: Record<string, string> } = {}) {
  return fetch(`${stack.api.url}${path}`, { redirect: 'manual', ...init });
}

const form = (token: string) => new URLSearchParams({ token }).toString();
const FORM = 'application/x-www-form-urlencoded';

/** Logs in as a browser would (same origin), answering the cookie pair `name=value`. */
async function loginCookie(token: string): Promise<string> {
  const res = await raw('/admin/login', { method: 'POST', headers: { 'content-type': FORM, origin }, body: form(token) });
  expect(res.status).toBe(303);
  return (res.headers.get('set-cookie') ?? '').split(';')[0] as string;
}

/** The dashboard's own API: both queues, with the jobs of `active` (every status). */
async function boardQueues(headers: Record<string, string>, active = '') {
  const res = await raw(`/admin/queues/api/queues?activeQueue=${active}&status=latest&page=1&jobsPerPage=50`, { headers });
  expect(res.status).toBe(200);
  return (await res.json()) as { queues: { name: string; readOnlyMode: boolean; isPaused: boolean; jobs: { id: string; data: any; opts: any }[] }[] };
}

beforeAll(async () => {
  receiver = new Receiver();
  await receiver.start();
  stack = await startStack({ name: 'admin', env: { WEBHOOK_ALLOW_HTTP: 'true', WEBHOOK_ALLOW_CIDRS: '127.0.0.0/8,::1/128' } });
  tenant = await stack.token('acme');
  admin = await adminToken(stack);
  origin = stack.api.url;
});
afterAll(async () => {
  await stack?.close();
  await receiver?.close();
});

describe('token groups', () => {
  it('when signToken is given no groups, then the token names none (admin must be asked for)', async () => {
    const opts = { secret: stack.config.JWT_SECRET };
    expect((await verifyToken(await signToken({ ...opts, account: 'acme' }), opts)).groups).toEqual([]);
    expect((await verifyToken(admin, opts)).groups).toEqual(['admin']);
  });
});

describe('keyferry token --admin (npm run token -- … --admin)', () => {
  const token = async (...flags: string[]) => {
    const { stdout } = await promisify(execFile)(process.execPath, ['--import', 'tsx', 'api/cli/main.ts', 'token', '--account', 'ops', ...flags], {
      cwd: join(import.meta.dirname, '..'),
      env: { PATH: process.env.PATH ?? '', JWT_SECRET: stack.config.JWT_SECRET },
    });
    return stdout.trim();
  };

  it('prints an admin-group token only with --admin, and only that one opens the dashboard', async () => {
    const [plain, withAdmin] = await Promise.all([token(), token('--admin')]);
    const opts = { secret: stack.config.JWT_SECRET };
    expect((await verifyToken(plain, opts)).groups).toEqual([]);
    expect((await verifyToken(withAdmin, opts)).groups).toEqual(['admin']);
    expect((await raw('/admin/queues', { headers: { authorization: `Bearer ${plain}` } })).status).toBe(403);
    expect((await raw('/admin/queues', { headers: { authorization: `Bearer ${withAdmin}` } })).status).toBe(200);
  });
});

describe('access to /admin/queues', () => {
  // The page, a static asset and bull-board's API: all behind the same check.
  const paths = ['/admin/queues', '/admin/queues/', '/admin/queues/queue/upload-key', '/admin/queues/static/images/logo.svg', '/admin/queues/api/queues'];

  it('when no token is sent, then every dashboard path answers 401 problem+json', async () => {
    for (const path of paths) {
      const res = await raw(path);
      expect(res.status, path).toBe(401);
      expect(res.headers.get('content-type'), path).toMatch(/^application\/problem\+json/);
      expect(((await res.json()) as { code: string }).code).toBe('unauthorized');
    }
  });

  it('when a tenant token (no admin group) is sent, as header or as cookie, then 403 problem+json', async () => {
    for (const path of paths) {
      const res = await raw(path, { headers: { authorization: `Bearer ${tenant}` } });
      expect(res.status, path).toBe(403);
      expect(res.headers.get('content-type'), path).toMatch(/^application\/problem\+json/);
      expect(await res.json()).toMatchObject({ status: 403, code: 'forbidden', title: 'Forbidden' });
    }
    const viaCookie = await raw('/admin/queues/api/queues', { headers: { cookie: `${ADMIN_COOKIE}=${tenant}` } });
    expect(viaCookie.status).toBe(403);
  });

  it('when a bad, expired or foreign-signed token is sent, then 401 (and a dead cookie is cleared)', async () => {
    const expired = await adminToken(stack, -10);
    const foreign = await signToken({ secret: randomBytes(32).toString('hex'), account: 'ops', groups: ['admin'] });
    for (const token of [expired, foreign, 'not.a.jwt']) {
      expect((await raw('/admin/queues', { headers: { authorization: `Bearer ${token}` } })).status).toBe(401);
    }
    expect((await raw('/admin/queues', { headers: { authorization: `Basic ${Buffer.from('a:b').toString('base64')}`, cookie: `${ADMIN_COOKIE}=${admin}` } })).status).toBe(401);
    const res = await raw('/admin/queues', { headers: { cookie: `${ADMIN_COOKIE}=${expired}` } });
    expect(res.status).toBe(401);
    expect(res.headers.get('set-cookie')).toMatch(new RegExp(`^${ADMIN_COOKIE}=;.*Expires=Thu, 01 Jan 1970`));
  });

  it('when an admin token is sent, then the page, its assets and the API of both queues answer', async () => {
    const auth = { authorization: `Bearer ${admin}` };
    const page = await raw('/admin/queues', { headers: auth });
    expect(page.status).toBe(200);
    expect(page.headers.get('content-type')).toMatch(/^text\/html/);
    expect(page.headers.get('cache-control')).toBe('no-store');
    expect(page.headers.get('content-security-policy')).toContain("frame-ancestors 'none'");
    expect(page.headers.get('x-powered-by')).toBeNull();
    const html = await page.text();
    expect(html).toContain('<base href="/admin/queues/"');
    // Every script and stylesheet the page names is served from here, behind the check.
    const assets = [...html.matchAll(/(?:src|href)="(static\/[^"]+)"/g)].map((m) => `/admin/queues/${m[1]}`);
    expect(assets.length).toBeGreaterThanOrEqual(3);
    for (const asset of assets) {
      expect((await raw(asset, { headers: auth })).status, asset).toBe(200);
      expect((await raw(asset)).status, asset).toBe(401);
    }
    const { queues } = await boardQueues(auth);
    expect(queues.map((q) => q.name).sort()).toEqual(['upload-key', 'webhook']);
    // ADMIN_READ_ONLY defaults to true.
    expect(queues.every((q) => q.readOnlyMode)).toBe(true);
  });

  it('when the admin cookie is sent to the tenant API, then it is not accepted there (401)', async () => {
    const res = await raw('/api/v1/cckm/aws/kms', { headers: { cookie: `${ADMIN_COOKIE}=${admin}` } });
    expect(res.status).toBe(401);
    // The same token as a bearer header is an ordinary token of account "ops".
    expect((await raw('/api/v1/cckm/aws/kms', { headers: { authorization: `Bearer ${admin}` } })).status).toBe(200);
  });

  it('when the board is read-only, then its actions answer 405 and change nothing', async () => {
    const res = await raw('/admin/queues/api/queues/upload-key/pause', { method: 'PUT', headers: { authorization: `Bearer ${admin}` } });
    expect(res.status).toBe(405);
    expect((await boardQueues({ authorization: `Bearer ${admin}` })).queues.find((q) => q.name === 'upload-key')?.isPaused).toBe(false);
  });
});

describe('login, cookie, logout', () => {
  it('serves a login form that posts the token to /admin/login', async () => {
    const res = await raw('/admin/login');
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toMatch(/^text\/html/);
    const html = await res.text();
    expect(html).toMatch(/<form method="post" action="\/admin\/login">/);
    expect(html).toMatch(/<textarea id="token" name="token"/);
  });

  it('when an admin token is posted, then an HttpOnly SameSite=Strict cookie for /admin expiring with the token is set, and the dashboard opens with it', async () => {
    const res = await raw('/admin/login', { method: 'POST', headers: { 'content-type': FORM, origin }, body: form(admin) });
    expect(res.status).toBe(303);
    expect(res.headers.get('location')).toBe('/admin/queues');
    const cookie = res.headers.get('set-cookie') ?? '';
    const attrs = cookie.split(';').map((s) => s.trim());
    expect(attrs[0]).toBe(`${ADMIN_COOKIE}=${admin}`);
    expect(attrs).toEqual(expect.arrayContaining(['Path=/admin', 'HttpOnly', 'SameSite=Strict']));
    expect(attrs).not.toContain('Secure'); // plain http here
    const expires = Date.parse(attrs.find((a) => a.startsWith('Expires='))?.slice(8) ?? '');
    const { exp } = JSON.parse(Buffer.from(admin.split('.')[1] as string, 'base64url').toString()) as { exp: number };
    expect(Math.abs(expires - exp * 1000)).toBeLessThanOrEqual(1000);

    const pair = attrs[0] as string;
    expect((await raw('/admin/queues', { headers: { cookie: pair } })).status).toBe(200);
    expect((await boardQueues({ cookie: pair })).queues).toHaveLength(2);
    // The login page now says who is logged in and offers the logout.
    const page = await (await raw('/admin/login', { headers: { cookie: pair } })).text();
    expect(page).toContain('alice@ops');
    expect(page).toContain('action="/admin/logout"');
  });

  it('when the login page is on https (a TLS proxy in front), then the cookie is Secure', async () => {
    const host = new URL(stack.api.url).host;
    const res = await raw('/admin/login', { method: 'POST', headers: { 'content-type': FORM, origin: `https://${host}` }, body: form(admin) });
    expect(res.status).toBe(303);
    expect((res.headers.get('set-cookie') ?? '').split(';').map((s) => s.trim())).toContain('Secure');
  });

  it('when a tenant token or garbage is posted, then no cookie: 403 / 401, as HTML for a browser and problem+json otherwise', async () => {
    const asBrowser = await raw('/admin/login', { method: 'POST', headers: { 'content-type': FORM, origin, accept: 'text/html' }, body: form(tenant) });
    expect(asBrowser.status).toBe(403);
    expect(asBrowser.headers.get('set-cookie')).toBeNull();
    expect(await asBrowser.text()).toContain('not in the group admin');
    const asClient = await raw('/admin/login', { method: 'POST', headers: { 'content-type': FORM, origin }, body: form('garbage') });
    expect(asClient.status).toBe(401);
    expect(asClient.headers.get('content-type')).toMatch(/^application\/problem\+json/);
    expect(asClient.headers.get('set-cookie')).toBeNull();
  });

  it('when logging out, then the cookie is cleared', async () => {
    const res = await raw('/admin/logout', { method: 'POST', headers: { origin } });
    expect(res.status).toBe(303);
    expect(res.headers.get('location')).toBe('/admin/login');
    expect(res.headers.get('set-cookie')).toMatch(new RegExp(`^${ADMIN_COOKIE}=; Path=/admin; Expires=Thu, 01 Jan 1970 00:00:00 GMT; HttpOnly; SameSite=Strict`));
  });
});

describe('cross-site request forgery', () => {
  it('when an unsafe /admin request carries no proof of coming from this origin, then 403 and nothing happens', async () => {
    const host = new URL(stack.api.url).host;
    const foreign: Record<string, string>[] = [
      {}, // neither Origin nor Sec-Fetch-Site
      { origin: 'https://evil.example' },
      { origin: 'null' },
      { origin: `http://sub.${host}` },
      { 'sec-fetch-site': 'cross-site', origin },
      { 'sec-fetch-site': 'same-site', origin }, // a sibling subdomain: SameSite=Strict lets its cookie through, this does not
    ];
    for (const headers of foreign) {
      const login = await raw('/admin/login', { method: 'POST', headers: { 'content-type': FORM, ...headers }, body: form(admin) });
      expect(login.status, JSON.stringify(headers)).toBe(403);
      expect(login.headers.get('set-cookie')).toBeNull();
      expect(((await login.json()) as { code: string }).code).toBe('cross_origin_refused');
      expect((await raw('/admin/logout', { method: 'POST', headers })).status).toBe(403);
    }
    const cookie = await loginCookie(admin);
    const action = await raw('/admin/queues/api/queues/upload-key/pause', { method: 'PUT', headers: { cookie, origin: 'https://evil.example' } });
    expect(action.status).toBe(403);
    // From this origin it reaches bull-board, which refuses it as read-only.
    expect((await raw('/admin/queues/api/queues/upload-key/pause', { method: 'PUT', headers: { cookie, 'sec-fetch-site': 'same-origin' } })).status).toBe(405);
  });
});

describe('what the dashboard shows of tenants', () => {
  it('upload jobs hold ids only; webhook jobs show neither their body nor the path or query of their URL; no key material anywhere', async () => {
    const material = randomBytes(32);
    await seedKms(stack, tenant);
    await seedLocalKey(stack, tenant, 'test-key', material.toString('hex'));
    const callback = `${receiver.url('/hook/sekrit-in-the-path')}?token=sekrit-in-the-query`;
    const res = await stack.call('POST', '/api/v1/cckm/aws/upload-key', { token: tenant, body: { ...example, aws_param: { Alias: 'admin-view' }, callback_url: callback } });
    expect(res.status).toBe(202);
    const job = await waitForJob(stack, tenant, res.body.id);
    expect(job.status).toBe('succeeded');

    const auth = { authorization: `Bearer ${admin}` };
    const deadline = Date.now() + 10_000;
    let webhookJobs: { data: any }[] = [];
    while (webhookJobs.length === 0 && Date.now() < deadline) {
      webhookJobs = (await boardQueues(auth, 'webhook')).queues.find((q) => q.name === 'webhook')?.jobs ?? [];
      if (webhookJobs.length === 0) await new Promise((r) => setTimeout(r, 100));
    }
    const uploadRes = await raw('/admin/queues/api/queues?activeQueue=upload-key&status=latest&page=1&jobsPerPage=50', { headers: auth });
    const webhookRes = await raw('/admin/queues/api/queues?activeQueue=webhook&status=latest&page=1&jobsPerPage=50', { headers: auth });
    const uploadText = await uploadRes.text();
    const webhookText = await webhookRes.text();

    const uploadJobs = (JSON.parse(uploadText) as Awaited<ReturnType<typeof boardQueues>>).queues.find((q) => q.name === 'upload-key')?.jobs ?? [];
    const shown = uploadJobs.find((j) => j.id === job.id);
    expect(shown?.data).toEqual({ jobId: job.id, account: 'acme' });

    const hook = (JSON.parse(webhookText) as Awaited<ReturnType<typeof boardQueues>>).queues.find((q) => q.name === 'webhook')?.jobs.find((j) => j.data.ownerId === job.id);
    expect(hook?.data).toMatchObject({ type: 'upload-key.succeeded', account: 'acme', url: `${new URL(callback).origin}/…` });
    expect(hook?.data.body).toMatch(/^\(\d+ bytes, not shown\)$/);

    for (const text of [uploadText, webhookText]) {
      expect(text).not.toContain('sekrit-in-the-query');
      expect(text).not.toContain('sekrit-in-the-path');
      for (const form of [material.toString('hex'), material.toString('base64'), material.toString('base64url')]) expect(text).not.toContain(form);
    }
    stack.watchForLeaks(material);
  });
});

describe('with ADMIN_READ_ONLY=false and ADMIN_GROUP=keyferry-operators', () => {
  let writable: TestStack;
  beforeAll(async () => {
    writable = await startStack({ name: 'admin-rw', worker: false, env: { ADMIN_READ_ONLY: 'false', ADMIN_GROUP: 'keyferry-operators' } });
  });

  it('when ADMIN_GROUP names another group, then a token of the "admin" group is refused and one of that group is let in', async () => {
    const sign = (groups: string[]) => signToken({ secret: writable.config.JWT_SECRET, account: 'ops', ttlSeconds: 600, groups });
    const board = async (token: string) => (await fetch(`${writable.api.url}/admin/queues/api/queues`, { headers: { authorization: `Bearer ${token}` } })).status;
    expect(await board(await sign(['admin']))).toBe(403);
    expect(await board(await sign(['keyferry-operators']))).toBe(200);

    const { stdout } = await promisify(execFile)(process.execPath, ['--import', 'tsx', 'api/cli/main.ts', 'token', '--account', 'ops', '--admin'], {
      cwd: join(import.meta.dirname, '..'),
      env: { PATH: process.env.PATH ?? '', JWT_SECRET: writable.config.JWT_SECRET, ADMIN_GROUP: 'keyferry-operators' },
    });
    expect((await verifyToken(stdout.trim(), { secret: writable.config.JWT_SECRET })).groups).toEqual(['keyferry-operators']);
    expect(await board(stdout.trim())).toBe(200);
  });
  afterAll(async () => {
    await writable?.close();
  });

  it('when an admin pauses and resumes the upload queue from the page origin, then BullMQ does so', async () => {
    const token = await signToken({ secret: writable.config.JWT_SECRET, account: 'ops', ttlSeconds: 600, groups: ['keyferry-operators'] });
    const call = (path: string) => fetch(`${writable.api.url}/admin/queues/api/queues/upload-key/${path}`, { method: 'PUT', headers: { authorization: `Bearer ${token}` } });
    const paused = async () => {
      const res = await fetch(`${writable.api.url}/admin/queues/api/queues`, { headers: { authorization: `Bearer ${token}` } });
      const body = (await res.json()) as { queues: { name: string; isPaused: boolean; readOnlyMode: boolean }[] };
      return body.queues.find((q) => q.name === 'upload-key');
    };
    expect(await paused()).toMatchObject({ readOnlyMode: false, isPaused: false });
    expect((await call('pause')).status).toBe(200);
    expect((await paused())?.isPaused).toBe(true);
    expect((await call('resume')).status).toBe(200);
    expect((await paused())?.isPaused).toBe(false);
  });
});
