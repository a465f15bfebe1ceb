import { readFileSync } from 'node:fs';
import net from 'node:net';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { isRateLimitBucket, keysUnder } from './helpers/redis-dump.js';
import { seedKms, seedLocalKey, startStack, TEST_REDIS_URL, type TestStack } from './helpers/stack.js';

/**
 * Random and near-valid requests at every route. Properties: never a 5xx; every error is
 * application/problem+json whose `status` is the HTTP status; a rejected request enqueues nothing and
 * writes no key. No worker runs, so accepted jobs simply wait; `Prefer: wait` is capped at 0 so that no
 * request waits, and the intake rate limit is out of the way.
 */
const example = JSON.parse(readFileSync(new URL('./fixtures/spec-example-request.json', import.meta.url), 'utf8')) as Record<string, unknown>;

let stack: TestStack;
let own: string;
let other: string;
/** Ids of acme's job and batch: other accounts must get 404 for them. */
let jobId: string;
let batchId: string;

beforeAll(async () => {
  // Its own Redis database, so that counting the keys under the prefix (a SCAN, before and after each
  // request) stays quick however many keys other test files hold at the time.
  const redisUrl = new URL(TEST_REDIS_URL);
  redisUrl.pathname = '/1';
  stack = await startStack({
    name: 'fuzz',
    worker: false,
    env: { REDIS_URL: redisUrl.toString(), MAX_PREFER_WAIT_SECONDS: '0', INTAKE_RATE_PER_SECOND: '1000000', INTAKE_BURST: '1000000', LOG_LEVEL: 'warn' },
  });
  own = await stack.token('acme');
  other = await stack.token('globex');
  await seedKms(stack, own);
  await seedLocalKey(stack, own, 'test-key');
  jobId = (await stack.call('POST', '/api/v1/cckm/aws/upload-key', { token: own, body: example })).body.id;
  batchId = (await stack.call('POST', '/api/v1/cckm/aws/upload-key/batch', { token: own, body: { items: [example] } })).body.id;
});
afterAll(async () => {
  await stack?.close();
});

interface FuzzRequest {
  method: string;
  path: string;
  headers: Record<string, string>;
  body?: string;
}

/** Every route of the API; `id` fills the path parameter. */
const ROUTES: { method: string; path: (id: string) => string; events?: true }[] = [
  { method: 'POST', path: () => '/api/v1/cckm/aws/upload-key' },
  { method: 'POST', path: () => '/api/v1/cckm/aws/upload-key/batch' },
  { method: 'GET', path: (id) => `/api/v1/jobs/${id}` },
  { method: 'DELETE', path: (id) => `/api/v1/jobs/${id}` },
  { method: 'GET', path: (id) => `/api/v1/jobs/${id}/events`, events: true },
  { method: 'GET', path: (id) => `/api/v1/jobs/${id}/deliveries` },
  { method: 'GET', path: (id) => `/api/v1/batches/${id}` },
  { method: 'DELETE', path: (id) => `/api/v1/batches/${id}` },
  { method: 'GET', path: (id) => `/api/v1/batches/${id}/jobs` },
  { method: 'GET', path: (id) => `/api/v1/batches/${id}/events`, events: true },
  { method: 'POST', path: (id) => `/api/v1/batches/${id}/retry-failed` },
  { method: 'GET', path: (id) => `/api/v1/batches/${id}/deliveries` },
  { method: 'GET', path: (id) => `/api/v1/cckm/aws/keys/${id}` },
  { method: 'POST', path: () => '/api/v1/cckm/aws/kms' },
  { method: 'GET', path: () => '/api/v1/cckm/aws/kms' },
  { method: 'GET', path: (id) => `/api/v1/cckm/aws/kms/${id}` },
  { method: 'POST', path: () => '/api/v1/cckm/aws/templates' },
  { method: 'GET', path: () => '/api/v1/cckm/aws/templates' },
  { method: 'GET', path: (id) => `/api/v1/cckm/aws/templates/${id}` },
  { method: 'POST', path: () => '/api/v1/vault/keys2' },
  { method: 'GET', path: () => '/api/v1/vault/keys2' },
  { method: 'GET', path: (id) => `/api/v1/vault/keys2/${id}` },
  { method: 'POST', path: () => '/api/v1/webhooks/secret' },
  { method: 'GET', path: () => '/healthz' },
  { method: 'GET', path: () => '/readyz' },
];
const POST_ROUTES = ROUTES.filter((r) => r.method === 'POST');

/** A valid body per POST route, the starting point of near-valid ones. */
const VALID_BODIES: Record<string, unknown> = {
  '/api/v1/cckm/aws/upload-key': example,
  '/api/v1/cckm/aws/upload-key/batch': { items: [example, { ...example, aws_param: { Alias: 'second' } }], callback_url: 'https://example.com/hook' },
  '/api/v1/cckm/aws/kms': { name: 'kms-2', account_id: '123456789012', regions: ['us-east-1'], aws_access_key_id: 'AKIAABCDEFGHIJKLMNOP', aws_secret_access_key: 'secret-secret-secret' },
  '/api/v1/cckm/aws/templates': { name: 'tpl', policy: { Version: '2012-10-17', Statement: [] } },
  '/api/v1/vault/keys2': { name: 'key-2', algorithm: 'AES', size: 256 },
};

// ---- arbitraries -----------------------------------------------------------------------------------

/** What fetch may send in a header: latin-1 without control characters. */
const headerText = fc.string({
  unit: fc.oneof(fc.integer({ min: 0x20, max: 0x7e }), fc.integer({ min: 0xa0, max: 0xff })).map((c) => String.fromCharCode(c)),
  maxLength: 300,
});

/** Values a field should not hold: other types, unicode, huge and hostile strings. */
const hostileValue: fc.Arbitrary<unknown> = fc.oneof(
  fc.jsonValue({ maxDepth: 3 }),
  fc.string({ unit: 'binary', maxLength: 64 }),
  fc.string({ unit: 'grapheme', minLength: 1000, maxLength: 20_000 }),
  fc.oneof(fc.integer(), fc.double({ noNaN: true, noDefaultInfinity: true }), fc.boolean(), fc.constant(null)),
  fc.constantFrom('', ' ', '../../etc/passwd', 'a\r\nSet-Cookie: x=1', '\u0000', '🔑'.repeat(500), 'alias/aws/x', '__proto__', 'x'.repeat(40_000), {}, [], [[[[]]]]),
);

/** Every path (as a list of keys) in a JSON value. */
function pathsOf(v: unknown, prefix: (string | number)[] = []): (string | number)[][] {
  if (typeof v !== 'object' || v === null) return [prefix];
  const entries = Array.isArray(v) ? v.map((c, i) => [i, c] as const) : Object.entries(v);
  return [prefix, ...entries.flatMap(([k, c]) => pathsOf(c, [...prefix, k]))];
}

type Mutation = { at: number; op: 'set' | 'delete' | 'add'; key: string; value: unknown };

/** Applies mutations to a copy of `base`: replace or delete what is at a path, or add a field next to it. */
function mutate(base: unknown, mutations: Mutation[]): unknown {
  let doc = structuredClone(base);
  for (const m of mutations) {
    const paths = pathsOf(doc);
    const path = paths[m.at % paths.length] as (string | number)[];
    if (path.length === 0) {
      doc = m.op === 'set' ? structuredClone(m.value) : doc;
      continue;
    }
    const parent = path.slice(0, -1).reduce<any>((o, k) => o[k], doc);
    const last = path[path.length - 1] as string | number;
    if (m.op === 'set') parent[last] = structuredClone(m.value);
    else if (m.op === 'delete') delete parent[last];
    else if (typeof parent === 'object' && parent !== null && !Array.isArray(parent)) parent[m.key] = structuredClone(m.value);
  }
  return doc;
}

const mutation: fc.Arbitrary<Mutation> = fc.record({
  at: fc.nat(),
  op: fc.constantFrom('set', 'delete', 'add'),
  key: fc.oneof(fc.string({ maxLength: 20 }), fc.constantFrom('__proto__', 'constructor', 'Policy', 'items')),
  value: hostileValue,
});

/** A body for a POST route: random JSON, or a valid body with one to three mutations. */
const bodyFor = (path: string): fc.Arbitrary<unknown> =>
  fc.oneof(
    { weight: 1, arbitrary: fc.jsonValue({ maxDepth: 4 }) },
    { weight: 4, arbitrary: fc.array(mutation, { minLength: 1, maxLength: 3 }).map((ms) => mutate(VALID_BODIES[path] ?? {}, ms)) },
  );

/** A path segment: random text (encoded), path traversal, CRLF, NUL, bad escapes, very long, real ids. */
const idSegment = (realIds: string[]): fc.Arbitrary<string> =>
  fc.oneof(
    fc.string({ unit: 'grapheme', maxLength: 40 }).map(encodeURIComponent),
    fc.string({ unit: 'grapheme-ascii', minLength: 1000, maxLength: 8000 }).map(encodeURIComponent),
    fc.uuid(),
    fc.constantFrom('..%2F..%2Fhealthz', '%2e%2e%2f%2e%2e%2f', '..%5C..%5Cwindows', '%0D%0ASet-Cookie:%20x=1', '%00', '%ZZ', '%', '%C0%AF', 'a.b.c', '*', '%7B%7D'),
    fc.constantFrom(...realIds),
  );

/** The Authorization header: mostly the caller's own token, else another account's, garbage or none. */
const authorization = (): fc.Arbitrary<string | undefined> =>
  fc.oneof(
    { weight: 6, arbitrary: fc.constant(`Bearer ${own}`) },
    { weight: 2, arbitrary: fc.constant(`Bearer ${other}`) },
    { weight: 1, arbitrary: fc.constant(undefined) },
    { weight: 1, arbitrary: headerText.map((t) => `Bearer ${t}`) },
    { weight: 1, arbitrary: fc.constantFrom(`Bearer ${own}x`, `Bearer ${own.split('.').slice(0, 2).join('.')}.`, `Basic ${own}`, 'Bearer', `bearer  ${own}`) },
  );

const contentType = fc.oneof(
  fc.constantFrom(
    'application/json',
    'application/json; charset=utf-8',
    'application/problem+json',
    'application/json; charset=latin1',
    'application/json; charset=utf-16',
    'text/plain',
    'application/x-www-form-urlencoded',
    'multipart/form-data; boundary=x',
    'application/octet-stream',
  ),
  headerText,
);

/** Other headers a client may send, with random values. */
const extraHeaders = fc.record(
  {
    'idempotency-key': fc.oneof(headerText, fc.string({ unit: 'grapheme-ascii', minLength: 256, maxLength: 600 })),
    prefer: fc.oneof(fc.nat().map((n) => `wait=${n}`), fc.constant('wait=99999999999999999999999'), headerText),
    'last-event-id': fc.oneof(headerText, fc.constant('1-0')),
    accept: fc.oneof(fc.constantFrom('text/event-stream', 'application/json', '*/*'), headerText),
    'content-encoding': fc.constantFrom('gzip', 'deflate', 'br', 'identity', 'zstd'),
    'x-forwarded-for': headerText,
  },
  { requiredKeys: [] },
);

/** Turns route + id + headers into a request; an own events stream (which would stay open) goes to another account. */
function request(route: (typeof ROUTES)[number], id: string, auth: string | undefined, headers: Record<string, string>, body?: string): FuzzRequest {
  const realIds = [jobId, batchId];
  const streams = route.events && auth === `Bearer ${own}` && realIds.includes(id);
  const authHeader = streams ? `Bearer ${other}` : auth;
  return {
    method: route.method,
    path: route.path(id),
    headers: { ...headers, ...(authHeader !== undefined ? { authorization: authHeader } : {}) },
    ...(body !== undefined && route.method !== 'GET' ? { body } : {}),
  };
}

// ---- the properties ----------------------------------------------------------------------------------

/** What a rejected request must leave as it was: BullMQ's waiting jobs and the keys under the prefix. */
async function footprint() {
  const bull = `{${stack.config.KEYFERRY_PREFIX}}:upload-key`;
  const [waiting, prioritized] = await Promise.all([stack.redis.llen(`${bull}:wait`), stack.redis.zcard(`${bull}:prioritized`)]);
  const keys = (await keysUnder(stack.redis, stack.config.KEYFERRY_PREFIX)).filter((k) => !isRateLimitBucket(k)).length;
  return { waiting, prioritized, keys };
}

const stats = { requests: 0, byStatus: new Map<number, number>() };

/** Sends one request and checks the three properties. */
async function check(req: FuzzRequest): Promise<void> {
  const before = await footprint();
  const res = await fetch(`${stack.api.url}${req.path}`, {
    method: req.method,
    headers: req.headers,
    ...(req.body !== undefined ? { body: req.body } : {}),
    signal: AbortSignal.timeout(10_000),
  });
  const text = await res.text();
  stats.requests++;
  stats.byStatus.set(res.status, (stats.byStatus.get(res.status) ?? 0) + 1);
  const what = `${req.method} ${req.path.slice(0, 200)} → ${res.status} ${text.slice(0, 300)}`;
  expect(res.status, what).toBeLessThan(500);
  if (res.status < 400) return;
  expect(res.headers.get('content-type'), what).toMatch(/^application\/problem\+json/);
  const problem = JSON.parse(text) as { status: unknown };
  expect(problem.status, what).toBe(res.status);
  expect(await footprint(), what).toEqual(before);
}

describe('fuzzing every route', () => {
  it('when random and near-valid JSON bodies are posted to every POST route, then no 5xx, errors are problems, rejections write nothing', async () => {
    const arb = fc
      .constantFrom(...POST_ROUTES)
      .chain((route) => fc.tuple(fc.constant(route), idSegment([jobId, batchId]), authorization(), bodyFor(route.path('x')), fc.constantFrom('application/json', 'application/json; charset=utf-8')));
    await fc.assert(
      fc.asyncProperty(arb, async ([route, id, auth, body, type]) => {
        await check(request(route, id, auth, { 'content-type': type }, JSON.stringify(body)));
      }),
      { numRuns: 1200 },
    );
  });

  it('when malformed JSON, wrong content types and encodings are sent, then no 5xx, errors are problems, rejections write nothing', async () => {
    const malformed = fc.oneof(
      fc.string({ unit: 'binary', maxLength: 200 }),
      fc.json().chain((j) => fc.nat({ max: Math.max(0, j.length - 1) }).map((n) => j.slice(0, n))),
      fc.json().map((j) => `${j}}`),
      fc.constantFrom('{"a":1,}', "{'a':1}", '{"a":NaN}', '[1e999999]', '"just a string"', '12', 'null', 'true', '{"a":"\\u00"}', '\uFEFF{}', '{"__proto__":{"polluted":1}}', '{"a":1}{"a":2}'),
    );
    const arb = fc.tuple(fc.constantFrom(...ROUTES), idSegment([jobId, batchId]), authorization(), malformed, contentType, fc.option(fc.constantFrom('gzip', 'deflate', 'br', 'zstd'), { nil: undefined }));
    await fc.assert(
      fc.asyncProperty(arb, async ([route, id, auth, body, type, encoding]) => {
        await check(request(route, id, auth, { 'content-type': type, ...(encoding ? { 'content-encoding': encoding } : {}) }, body));
      }),
      { numRuns: 700 },
    );
  });

  it('when random ids, tokens and headers reach every route, then no 5xx, errors are problems, rejections write nothing', async () => {
    const arb = fc.tuple(fc.constantFrom(...ROUTES), idSegment([jobId, batchId]), authorization(), extraHeaders, fc.option(contentType, { nil: undefined }));
    await fc.assert(
      fc.asyncProperty(arb, async ([route, id, auth, headers, type]) => {
        await check(request(route, id, auth, { ...headers, ...(type ? { 'content-type': type } : {}) }, route.method === 'POST' ? JSON.stringify(VALID_BODIES[route.path(id)] ?? {}) : undefined));
      }),
      { numRuns: 1200 },
    );
  });

  it('when bodies nest 10,000 levels deep or hold near-limit strings, then every POST route answers a 4xx problem or accepts, never a 5xx', async () => {
    const deepObject = '{"a":'.repeat(10_000) + '1' + '}'.repeat(10_000);
    const deepArray = '['.repeat(10_000) + ']'.repeat(10_000);
    const bodies = [
      deepObject,
      deepArray,
      `{"items":[${deepObject}]}`,
      `{"name":"deep","policy":${deepObject}}`,
      JSON.stringify({ name: 'deep', policy: deepObject }),
      `{"aws_param":{"Policy":${JSON.stringify(deepObject)}},"source_key_identifier":"test-key","region":"ap-south-1","kms":"kms"}`,
      JSON.stringify({ ...example, aws_param: { Description: 'é'.repeat(400_000) } }),
      JSON.stringify({ ...example, source_key_identifier: '🔑'.repeat(200_000) }),
      JSON.stringify({ name: 'x'.repeat(1_048_000) }),
    ];
    for (const route of POST_ROUTES) {
      for (const body of bodies) await check(request(route, batchId, `Bearer ${own}`, { 'content-type': 'application/json' }, body));
    }
  });
});

describe('requests Node refuses before Express', () => {
  it('when the request line or headers exceed 16 KiB, then 431 problem', async () => {
    const requests: { path: string; headers: Record<string, string> }[] = [
      { path: `/api/v1/jobs/${'a'.repeat(20_000)}`, headers: {} },
      { path: '/healthz', headers: { 'x-big': 'b'.repeat(20_000) } },
    ];
    for (const req of requests) {
      const res = await fetch(`${stack.api.url}${req.path}`, { headers: req.headers });
      expect(res.status).toBe(431);
      expect(res.headers.get('content-type')).toBe('application/problem+json');
      expect(await res.json()).toMatchObject({ status: 431, code: 'headers_too_large' });
    }
  });

  it('when the bytes are not HTTP, then 400 problem', async () => {
    const { port, hostname } = new URL(stack.api.url);
    for (const raw of ['GARBAGE\r\n\r\n', 'GET /healthz HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n', 'GET /heal\x00thz HTTP/1.1\r\n\r\n']) {
      const answer = await new Promise<string>((resolve, reject) => {
        const socket = net.connect(Number(port), hostname, () => socket.write(raw));
        let out = '';
        socket.on('data', (d: Buffer) => (out += d.toString('utf8')));
        socket.on('close', () => resolve(out));
        socket.on('error', reject);
      });
      expect(answer).toMatch(/^HTTP\/1\.1 400 Bad Request\r\n/);
      expect(answer).toContain('Content-Type: application/problem+json');
      expect(JSON.parse(answer.slice(answer.indexOf('\r\n\r\n') + 4))).toMatchObject({ status: 400, code: 'malformed_request' });
    }
  });

  it('when the fuzzing ran, then it sent thousands of requests and saw both acceptances and rejections', () => {
    expect(stats.requests).toBeGreaterThan(3000);
    const statuses = [...stats.byStatus.keys()];
    expect(statuses.some((s) => s >= 200 && s < 300)).toBe(true);
    expect(statuses.filter((s) => s >= 400).length).toBeGreaterThan(4);
  });
});
