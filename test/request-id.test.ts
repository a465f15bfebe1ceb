import type { Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import express from 'express';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { problemHandler } from '../api/problem.js';
import { requestLogger, requestLogging } from '../api/request-id.js';
import { createLogger } from '../shared/logger.js';
import { LogSink, startStack, type TestStack } from './helpers/stack.js';

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;

let stack: TestStack;
let token: string;

beforeAll(async () => {
  stack = await startStack({ name: 'reqid', worker: false });
  token = await stack.token('acme');
});
afterAll(async () => {
  await stack?.close();
});

type LogLine = Record<string, unknown>;
const parsed = (lines: string[]): LogLine[] => lines.map((l) => JSON.parse(l) as LogLine);

/** The access line of request `id`: written when the response finishes, which may be just after the client has it. */
async function accessLine(lines: string[], id: string): Promise<LogLine> {
  for (let i = 0; i < 100; i++) {
    const line = parsed(lines).find((l) => l.req_id === id && typeof l.status === 'number');
    if (line) return line;
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error(`no access line for ${id}`);
}

describe('X-Request-Id', () => {
  it('when the caller sends a sane X-Request-Id, then it is echoed', async () => {
    for (const id of ['abc-123', 'trace:0af7651916cd43dd.8448eb211c80319c_1', 'x'.repeat(128)]) {
      const res = await stack.call('GET', '/healthz', { headers: { 'x-request-id': id } });
      expect(res.status).toBe(200);
      expect(res.headers.get('x-request-id')).toBe(id);
    }
  });

  it('when it is missing or not a plain token, then the response gets a fresh UUID', async () => {
    const missing = await stack.call('GET', '/healthz');
    expect(missing.headers.get('x-request-id')).toMatch(UUID);
    for (const bad of ['', 'has space', 'semi;colon', 'x'.repeat(129), '<script>', 'a\u00e9b']) {
      const res = await stack.call('GET', '/healthz', { headers: { 'x-request-id': bad } });
      expect(res.headers.get('x-request-id')).toMatch(UUID);
    }
    const a = await stack.call('GET', '/healthz');
    const b = await stack.call('GET', '/healthz');
    expect(a.headers.get('x-request-id')).not.toBe(b.headers.get('x-request-id'));
  });

  it('when the answer is a problem, then its body carries the request id as request_id', async () => {
    const given = await stack.call('GET', '/api/v1/jobs/nope', { token, headers: { 'x-request-id': 'problem-1' } });
    expect(given.status).toBe(404);
    expect(given.headers.get('x-request-id')).toBe('problem-1');
    expect(given.body).toMatchObject({ status: 404, request_id: 'problem-1' });

    const unauthenticated = await stack.call('GET', '/api/v1/jobs/nope');
    expect(unauthenticated.status).toBe(401);
    expect(unauthenticated.body.request_id).toMatch(UUID);
    expect(unauthenticated.body.request_id).toBe(unauthenticated.headers.get('x-request-id'));

    const unknownRoute = await stack.call('GET', '/nowhere');
    expect(unknownRoute.body).toMatchObject({ status: 404, request_id: unknownRoute.headers.get('x-request-id') });
  });

  it('when Node refuses a request before Express, then the 431 problem still carries a fresh request id', async () => {
    const res = await fetch(`${stack.api.url}/healthz`, { headers: { 'x-big': 'b'.repeat(20_000) } });
    expect(res.status).toBe(431);
    const id = res.headers.get('x-request-id');
    expect(id).toMatch(UUID);
    expect(await res.json()).toMatchObject({ status: 431, request_id: id });
  });
});

describe('access log', () => {
  it('when a request is answered, then one access line has its req_id, method, path (no query), status and time, and no secret', async () => {
    const before = stack.logs.lines.length;
    const bodySecret = 'body-secret-value-4711';
    const querySecret = 'query-secret-value-4242';
    const res = await stack.call('POST', `/api/v1/cckm/aws/upload-key?token=${querySecret}`, {
      token,
      headers: { 'x-request-id': 'access-1' },
      body: { nonsense: bodySecret },
    });
    expect(res.status).toBe(400);
    const line = await accessLine(stack.logs.lines, 'access-1');
    expect(line).toMatchObject({ req_id: 'access-1', method: 'POST', path: '/api/v1/cckm/aws/upload-key', status: 400, level: 40, msg: 'request completed' });
    expect(line.responseTime).toEqual(expect.any(Number));
    // Exactly these fields: no request or response object (headers), no body, no query.
    expect(Object.keys(line).sort()).toEqual(['level', 'method', 'msg', 'name', 'path', 'pid', 'req_id', 'responseTime', 'status', 'time'].sort());
    expect(parsed(stack.logs.lines.slice(before)).filter((l) => l.req_id === 'access-1' && typeof l.status === 'number')).toHaveLength(1);

    const ok = await stack.call('GET', '/api/v1/jobs/nope', { token, headers: { 'x-request-id': 'access-2' } });
    expect(ok.status).toBe(404);
    expect(await accessLine(stack.logs.lines, 'access-2')).toMatchObject({ path: '/api/v1/jobs/nope', status: 404 });

    for (const l of stack.logs.lines) {
      expect(l).not.toContain(token);
      expect(l).not.toContain(bodySecret);
      expect(l).not.toContain(querySecret);
      expect(l.toLowerCase()).not.toContain('bearer');
    }
  });

  it('when a request succeeds, then its access line is at info level', async () => {
    const res = await stack.call('GET', '/api/v1/cckm/aws/kms', { token, headers: { 'x-request-id': 'ok-1' } });
    expect(res.status).toBe(200);
    expect(await accessLine(stack.logs.lines, 'ok-1')).toMatchObject({ level: 30, status: 200, msg: 'request completed' });
  });

  it('when a probe is answered, then its access line is at debug level', async () => {
    await stack.call('GET', '/healthz', { headers: { 'x-request-id': 'probe-1' } });
    expect(await accessLine(stack.logs.lines, 'probe-1')).toMatchObject({ level: 20, path: '/healthz', status: 200 });
  });
});

describe('unhandled errors', () => {
  let server: Server;
  let url: string;
  const logs = new LogSink();

  beforeAll(async () => {
    const app = express();
    const logger = createLogger('debug', 'keyferry-test', logs);
    app.use(requestLogging(logger));
    app.get('/boom', () => {
      throw new Error('kaboom');
    });
    app.get('/log-secrets', (req, res) => {
      requestLogger(req, logger).info({ material: 'top-material-0001', conn: { aws_secret_access_key: 'nested-secret-0002' }, a: { b: { material: 'deep-material-0003' } } }, 'handler line');
      req.log.info({ conn: { aws_secret_access_key: 'nested-secret-0005' }, a: { b: { material: 'deep-material-0006' } } }, 'request logger line');
      res.log.info({ conn: { aws_secret_access_key: 'nested-secret-0004' } }, 'response logger line');
      res.json({ ok: true });
    });
    app.use(problemHandler(createLogger('debug', 'keyferry-test', logs)));
    server = await new Promise<Server>((resolve) => {
      const s = app.listen(0, '127.0.0.1', () => resolve(s));
    });
    url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  });
  afterAll(async () => {
    await new Promise((resolve) => server.close(resolve));
  });

  it('when a handler throws, then the 500 problem and the error log line carry the request id', async () => {
    const res = await fetch(`${url}/boom`, { headers: { 'x-request-id': 'boom-1', authorization: 'Bearer not-to-be-logged' } });
    expect(res.status).toBe(500);
    expect(await res.json()).toMatchObject({ code: 'internal_error', request_id: 'boom-1' });
    const access = await accessLine(logs.lines, 'boom-1');
    expect(access).toMatchObject({ level: 50, status: 500, path: '/boom', msg: 'request failed' });
    expect(access).not.toHaveProperty('err'); // a plain 5xx: the status says it all
    const errorLine = parsed(logs.lines).find((l) => l.msg === 'unhandled error');
    expect(errorLine).toMatchObject({ req_id: 'boom-1', level: 50 });
    for (const l of logs.lines) expect(l).not.toContain('not-to-be-logged');
  });

  it('when a handler logs through requestLogger, req.log or res.log, then every redaction path applies, nested ones included, and requestLogger adds the req_id', async () => {
    const res = await fetch(`${url}/log-secrets`, { headers: { 'x-request-id': 'secrets-1' } });
    expect(res.status).toBe(200);
    await accessLine(logs.lines, 'secrets-1');
    const line = parsed(logs.lines).find((l) => l.msg === 'handler line');
    expect(line).toMatchObject({ req_id: 'secrets-1', material: '[redacted]', conn: { aws_secret_access_key: '[redacted]' }, a: { b: { material: '[redacted]' } } });
    const plain = parsed(logs.lines).find((l) => l.msg === 'request logger line');
    expect(plain).toMatchObject({ conn: { aws_secret_access_key: '[redacted]' }, a: { b: { material: '[redacted]' } } });
    // req.log is the service's logger, not a child made for every request.
    expect(plain).not.toHaveProperty('req_id');
    expect(parsed(logs.lines).find((l) => l.msg === 'response logger line')).toMatchObject({ conn: { aws_secret_access_key: '[redacted]' } });
    for (const l of logs.lines) expect(l).not.toMatch(/top-material|nested-secret|deep-material/);
  });
});
