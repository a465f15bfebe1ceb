import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium, type BrowserContext, type Page } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ADMIN_COOKIE } from '../api/admin.js';
import { signToken } from '../shared/auth.js';
import { startStack, type TestStack } from './helpers/stack.js';

/*
 * A real browser (Debian's Chromium, driven by playwright-core) against an in-process stack: the API docs
 * render their operations, and the queue dashboard opens after the login form for an admin token, and only
 * for one. One browser for the file; nothing leaves loopback.
 */

const CHROMIUM = '/usr/bin/chromium';

let stack: TestStack;
let context: BrowserContext;
let page: Page;
let profile: string;
/** Script errors of the pages (an exception, or a script blocked by the Content-Security-Policy). */
const pageErrors: string[] = [];

beforeAll(async () => {
  profile = mkdtempSync(join(tmpdir(), 'keyferry-chromium-'));
  // Both are kept as soon as they exist, so that afterAll closes the stack (and deletes its keys) also when
  // the browser could not start.
  const [started, launched] = await Promise.allSettled([
    startStack({ name: 'browser', worker: false }),
    chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM,
      headless: true,
      args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    }),
  ]);
  if (started.status === 'fulfilled') stack = started.value;
  if (launched.status === 'fulfilled') context = launched.value;
  for (const outcome of [started, launched]) if (outcome.status === 'rejected') throw outcome.reason;
  // Only the stack under test is reachable (bull-board's page names a web font elsewhere).
  const own = new URL(stack.api.url).origin;
  await context.route('**/*', (route) => (new URL(route.request().url()).origin === own ? route.continue() : route.abort()));
  page = context.pages()[0] ?? (await context.newPage());
  page.on('pageerror', (err) => pageErrors.push(err.message));
  page.on('console', (msg) => {
    if (msg.type() === 'error' && /Content Security Policy/.test(msg.text()) && /script/.test(msg.text())) pageErrors.push(msg.text());
  });
}, 30_000);

afterAll(async () => {
  await context?.close();
  await stack?.close();
  if (profile) rmSync(profile, { recursive: true, force: true });
});

const adminToken = () => signToken({ secret: stack.config.JWT_SECRET, account: 'ops', subject: 'alice@ops', ttlSeconds: 600, groups: ['admin'] });

async function logIn(token: string) {
  await page.goto(`${stack.api.url}/admin/login`);
  await page.locator('textarea[name="token"]').fill(token);
  const [response] = await Promise.all([page.waitForNavigation(), page.getByRole('button', { name: 'Log in' }).click()]);
  return response;
}

describe('in Chromium', () => {
  it('/docs: Swagger UI renders the operations of the OpenAPI document', async () => {
    const res = await page.goto(`${stack.api.url}/docs`);
    expect(res?.status()).toBe(200);
    const upload = page.locator('.opblock-post').filter({ has: page.locator('[data-path="/api/v1/cckm/aws/upload-key"]') });
    await upload.first().waitFor({ state: 'visible', timeout: 10_000 });
    expect(await upload.first().locator('.opblock-summary-method').innerText()).toBe('POST');
    await page.locator('.opblock-get [data-path="/api/v1/jobs/{id}"]').first().waitFor({ state: 'visible' });
    expect(await page.locator('.opblock').count()).toBeGreaterThan(20);
    expect(pageErrors).toEqual([]);
  });

  it('/admin: a tenant token is refused at the login and the dashboard stays closed', async () => {
    const res = await logIn(await stack.token('acme'));
    expect(res?.status()).toBe(403);
    await page.getByRole('alert').filter({ hasText: 'not in the group admin' }).waitFor({ state: 'visible' });
    expect(await context.cookies()).toEqual([]);
    const board = await page.goto(`${stack.api.url}/admin/queues`);
    expect(board?.status()).toBe(401);
    expect(await page.locator('body').innerText()).toContain('/admin/login');
  });

  it('/admin: an admin token logs in, the dashboard renders both queues, and logging out closes it again', async () => {
    const res = await logIn(await adminToken());
    expect(new URL(page.url()).pathname).toBe('/admin/queues');
    expect(res?.status()).toBe(200);
    // bull-board's React app fetched its queues from /admin/queues/api with the cookie, and shows them.
    await page.getByText('upload-key', { exact: true }).first().waitFor({ state: 'visible', timeout: 10_000 });
    await page.getByText('webhook', { exact: true }).first().waitFor({ state: 'visible', timeout: 10_000 });
    expect(pageErrors).toEqual([]);

    const [cookie, ...others] = await context.cookies();
    expect(others).toEqual([]);
    expect(cookie).toMatchObject({ name: ADMIN_COOKIE, path: '/admin', httpOnly: true, sameSite: 'Strict', secure: false });
    expect(cookie?.expires).toBeGreaterThan(Date.now() / 1000 + 500);
    expect(await page.evaluate(() => document.cookie)).toBe(''); // HttpOnly: no script reads it

    await page.goto(`${stack.api.url}/admin/login`);
    await page.getByText('alice@ops').waitFor({ state: 'visible' });
    await Promise.all([page.waitForNavigation(), page.getByRole('button', { name: 'Log out' }).click()]);
    expect(new URL(page.url()).pathname).toBe('/admin/login');
    expect(await context.cookies()).toEqual([]);
    expect((await page.goto(`${stack.api.url}/admin/queues`))?.status()).toBe(401);
  });
});
