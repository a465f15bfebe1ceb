import type { Express } from 'express';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createApp, type AppDeps } from '../api/app.js';
import { buildOpenApiDocument } from '../api/openapi.js';
import { loadConfig } from '../shared/config.js';
import { createLogger } from '../shared/logger.js';
import { startStack, testEnv, type TestStack } from './helpers/stack.js';

const METHODS = ['get', 'post', 'put', 'patch', 'delete'] as const;

interface Layer {
  route?: { path: string | string[]; methods: Record<string, boolean> };
  handle?: { stack?: Layer[] };
}

/** "METHOD /path" of every route the app registers, `:id` written `{id}`, found through nested routers. */
function appRoutes(app: Express): Set<string> {
  const found = new Set<string>();
  const walk = (stack: Layer[]) => {
    for (const layer of stack) {
      if (layer.route) {
        const paths = Array.isArray(layer.route.path) ? layer.route.path : [layer.route.path];
        for (const path of paths) {
          for (const [method, on] of Object.entries(layer.route.methods)) {
            if (on && method !== '_all') found.add(`${method.toUpperCase()} ${path.replace(/:(\w+)/g, '{$1}')}`);
          }
        }
      } else if (layer.handle?.stack) {
        walk(layer.handle.stack);
      }
    }
  };
  walk((app as unknown as { router: { stack: Layer[] } }).router.stack);
  return found;
}

/**
 * The operators' routes (api/admin.ts) are not part of the tenant API the document describes: they are left
 * out of the comparison, but only these, by name, so a new /admin route has to be listed here on purpose.
 * The dashboard under /admin/queues is bull-board's own Express app, mounted as one handler and not walked.
 */
const ADMIN_ROUTES = ['GET /admin/login', 'POST /admin/login', 'POST /admin/logout'];

function documentedRoutes(): Set<string> {
  const found = new Set<string>();
  for (const [path, item] of Object.entries(buildOpenApiDocument().paths ?? {})) {
    for (const method of METHODS) if (item[method]) found.add(`${method.toUpperCase()} ${path}`);
  }
  return found;
}

describe('OpenAPI document', () => {
  it('is OpenAPI 3.1 with paths, bearer security and the problem schema', () => {
    const doc = buildOpenApiDocument();
    expect(doc.openapi).toMatch(/^3\.1\.\d+$/);
    expect(Object.keys(doc.paths ?? {}).length).toBeGreaterThan(0);
    expect(doc.components?.securitySchemes?.bearerAuth).toMatchObject({ type: 'http', scheme: 'bearer' });
    expect(doc.components?.schemas?.Problem).toBeDefined();
    expect(doc.components?.schemas?.UploadKeyRequest).toBeDefined();
    const upload = doc.paths?.['/api/v1/cckm/aws/upload-key']?.post;
    expect(Object.keys(upload?.responses ?? {})).toEqual(expect.arrayContaining(['201', '202', '400', '401']));
    expect(upload?.responses?.['400']).toMatchObject({ content: { 'application/problem+json': {} } });
    expect(upload?.security).toEqual([{ bearerAuth: [] }]);
    expect(doc.paths?.['/healthz']?.get?.security).toEqual([]);
    expect(Object.keys(doc.paths?.['/api/v1/cckm/aws/kms']?.post?.responses ?? {})).toContain('201');
  });

  it('documents exactly the routes the Express app serves', () => {
    // Registering routes touches none of the stores; only config values are read.
    const config = loadConfig(testEnv('openapi-routes'));
    const stub = {} as never;
    const deps: AppDeps = {
      config,
      logger: createLogger('silent', 'openapi-test'),
      redis: stub,
      stores: { keys: stub } as never,
      queue: stub,
      intake: stub,
      waiter: stub,
      notifier: stub,
      webhookSecrets: stub,
      deliveries: stub,
      goneUrls: stub,
    };
    const served = appRoutes(createApp(deps));
    const documented = documentedRoutes();
    expect([...served].filter((r) => / \/admin(\/|$)/.test(r)).sort()).toEqual([...ADMIN_ROUTES].sort());
    expect([...documented].filter((r) => / \/admin(\/|$)/.test(r))).toEqual([]);
    for (const route of ADMIN_ROUTES) served.delete(route);
    expect(served.size).toBeGreaterThan(20);
    expect([...served].filter((r) => !documented.has(r)).sort()).toEqual([]);
    expect([...documented].filter((r) => !served.has(r)).sort()).toEqual([]);
  });
});

describe('GET /openapi.json and /docs', () => {
  let stack: TestStack;
  beforeAll(async () => {
    stack = await startStack({ name: 'openapi' });
  });
  afterAll(async () => {
    await stack?.close();
  });

  it('serves the document as JSON without a token', async () => {
    const res = await stack.call('GET', '/openapi.json');
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toMatch(/^application\/json/);
    expect(res.body.openapi).toMatch(/^3\.1\./);
    expect(Object.keys(res.body.paths)).toContain('/api/v1/jobs/{id}');
  });

  it('serves the Swagger UI page and its local assets', async () => {
    const res = await fetch(`${stack.api.url}/docs`);
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toMatch(/^text\/html/);
    const html = await res.text();
    expect(html).toContain('/openapi.json');
    const assets = [...html.matchAll(/(?:src|href)="([^"]+)"/g)].map((m) => m[1] as string);
    expect(assets).toEqual(expect.arrayContaining(['/docs/swagger-ui.css', '/docs/swagger-ui-bundle.js']));
    for (const asset of assets) {
      expect(asset.startsWith('/')).toBe(true); // served here: no CDN
      const a = await fetch(`${stack.api.url}${asset}`);
      expect(a.status, asset).toBe(200);
      expect((await a.arrayBuffer()).byteLength, asset).toBeGreaterThan(1000);
    }
  });
});
