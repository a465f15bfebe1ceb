/**
 * KMS_ENDPOINT_HOSTS: a KMS connection's endpoint must name AWS KMS's own hosts or one the operator lists,
 * since whoever answers GetParametersForImport chooses the key the material is wrapped under.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startApi } from '../api/server.js';
import { loadConfig } from '../shared/config.js';
import { AWS_KMS_ENDPOINT_HOSTS, kmsEndpointProblem } from '../shared/kms-endpoints.js';
import { createLogger } from '../shared/logger.js';
import { queuedJobs, seedKms, seedLocalKey, startStack, testEnv, waitForJob, type TestStack } from './helpers/stack.js';

const aws = { hosts: AWS_KMS_ENDPOINT_HOSTS, allowHttp: false };

describe('kmsEndpointProblem', () => {
  it("when the default list is asked, then AWS KMS's regional, FIPS, China, dual-stack and VPC endpoints pass, and hosts others can serve under AWS's domains, other ports and http do not", () => {
    const ok = [
      'https://kms.us-east-1.amazonaws.com',
      'https://KMS.eu-west-1.amazonaws.com/',
      'https://kms.us-east-1.amazonaws.com:443',
      'https://kms-fips.us-gov-west-1.amazonaws.com',
      'https://kms.cn-north-1.amazonaws.com.cn',
      'https://kms.ap-south-1.api.aws',
      'https://vpce-0a1b2c3d4e5f-abcdefgh.kms.us-east-1.vpce.amazonaws.com',
    ];
    const refused = [
      'https://abc123.execute-api.us-east-1.amazonaws.com', // API Gateway: anyone's
      'https://x.lambda-url.us-east-1.on.aws',
      'https://kms.s3.amazonaws.com', // an S3 bucket named kms
      'https://kms-fips.s3-website-us-east-1.amazonaws.com',
      'https://kms.us-east-1.amazonaws.com.evil.example',
      'https://kms.us-east-1.amazonaws.com.', // a trailing dot: one label more
      'https://evil-kms.us-east-1.amazonaws.com',
      'https://kms.us-east-1.evil.amazonaws.com',
      'https://vpce-1.vpce-svc-0123.us-east-1.vpce.amazonaws.com', // someone's PrivateLink service
      'https://vpce-1.kms.us-east-1.vpce.amazonaws.com:6379', // another port
      'https://kms.us-east-1.amazonaws.com@evil.example',
      'https://user@kms.us-east-1.amazonaws.com', // no credentials in the URL at all
      'HTTP://kms.us-east-1.amazonaws.com', // http, in any case
      'http://kms.us-east-1.amazonaws.com',
      'ftp://kms.us-east-1.amazonaws.com',
      'https://127.0.0.1:4599',
      'not a url',
    ];
    for (const url of ok) expect(kmsEndpointProblem(url, aws, []), url).toBeUndefined();
    for (const url of refused) expect(kmsEndpointProblem(url, aws, []), url).toEqual(expect.any(String));
    expect(kmsEndpointProblem('HTTP://kms.us-east-1.amazonaws.com', aws, [])).toMatch(/https/);
    expect(kmsEndpointProblem('http://127.0.0.1:4599', { hosts: ['127.0.0.1:*'], allowHttp: true }, [])).toBeUndefined();
    expect(kmsEndpointProblem('http://127.0.0.1:4599', { hosts: ['127.0.0.1:4599'], allowHttp: true }, [])).toBeUndefined();
    expect(kmsEndpointProblem('http://127.0.0.1:4599', { hosts: ['127.0.0.1'], allowHttp: true }, [])).toEqual(expect.any(String));
    expect(kmsEndpointProblem('https://anything.example:8443', { hosts: ['*'], allowHttp: false }, [])).toBeUndefined();
  });

  it("when an endpoint matches only through a `<region>` label, then it serves that region alone; hosts without one serve any", () => {
    expect(kmsEndpointProblem('https://kms.us-east-1.amazonaws.com', aws, ['us-east-1'])).toBeUndefined();
    expect(kmsEndpointProblem('https://kms.us-east-1.amazonaws.com', aws, ['us-east-1', 'eu-west-1', 'eu-west-1'])).toBe(
      'A regional endpoint of us-east-1: it cannot serve eu-west-1 (AWS refuses requests signed for another region).',
    );
    expect(kmsEndpointProblem('https://vpce-0a1b-abcd.kms.eu-west-1.vpce.amazonaws.com', aws, ['us-east-1'])).toMatch(/of eu-west-1: it cannot serve us-east-1 /);
    expect(kmsEndpointProblem('https://kms-fips.us-gov-west-1.amazonaws.com', aws, ['us-gov-east-1'])).toMatch(/of us-gov-west-1/);
    // Refused for its host, whatever the regions.
    expect(kmsEndpointProblem('https://kms.s3.amazonaws.com', aws, ['us-east-1'])).toMatch(/KMS_ENDPOINT_HOSTS/);
    // A pattern without `<region>` says nothing of the host's region.
    expect(kmsEndpointProblem('http://127.0.0.1:4599', { hosts: ['127.0.0.1:*'], allowHttp: true }, ['us-east-1', 'eu-west-1'])).toBeUndefined();
    expect(kmsEndpointProblem('https://kms.us-east-1.amazonaws.com', { hosts: ['*'], allowHttp: false }, ['eu-west-1'])).toBeUndefined();
    expect(kmsEndpointProblem('https://kms.us-east-1.amazonaws.com', { hosts: [...AWS_KMS_ENDPOINT_HOSTS, 'kms.us-east-1.amazonaws.com'], allowHttp: false }, ['eu-west-1'])).toBeUndefined();
  });

  it('when KMS_ENDPOINT_HOSTS is unset, then it is the AWS list; a bad pattern stops the start', () => {
    const { KMS_ENDPOINT_HOSTS: _, ...env } = testEnv('kms-endpoints');
    expect(loadConfig(env).KMS_ENDPOINT_HOSTS).toEqual([...AWS_KMS_ENDPOINT_HOSTS]);
    expect(loadConfig({ ...env, KMS_ENDPOINT_HOSTS: 'kms.<region>.amazonaws.com, Emulator:4599' }).KMS_ENDPOINT_HOSTS).toEqual(['kms.<region>.amazonaws.com', 'emulator:4599']);
    for (const bad of ['https://kms.example', 'kms.*.amazon*.com', 'kms.example:port', '<region>.kms.<region>.example']) expect(() => loadConfig({ ...env, KMS_ENDPOINT_HOSTS: bad }), bad).toThrow(/KMS_ENDPOINT_HOSTS/);
  });
});

describe('KMS connection endpoints', () => {
  let stack: TestStack;
  let token: string;
  beforeAll(async () => {
    stack = await startStack({ name: 'kms-endpoints', worker: false });
    token = await stack.token('acme');
    await seedKms(stack, token);
    await seedLocalKey(stack, token, 'test-key');
  });
  afterAll(async () => {
    await stack?.close();
  });

  it('when a connection names an endpoint outside KMS_ENDPOINT_HOSTS, then 400 naming `endpoint`, and nothing is stored', async () => {
    const before = await stack.call('GET', '/api/v1/cckm/aws/kms', { token });
    const res = await stack.call('POST', '/api/v1/cckm/aws/kms', {
      token,
      body: { name: 'rogue', account_id: '123456789012', regions: ['us-east-1'], endpoint: 'https://abc123.execute-api.us-east-1.amazonaws.com' },
    });
    expect(res.status).toBe(400);
    expect(res.headers.get('content-type')).toMatch(/^application\/problem\+json/);
    expect(res.body.errors).toEqual([{ path: 'endpoint', message: expect.stringContaining('KMS_ENDPOINT_HOSTS') }]);
    expect((await stack.call('GET', '/api/v1/cckm/aws/kms', { token })).body.total).toBe(before.body.total);
  });

  it('when a worker runs with a list that no longer allows a connection, then its job fails with kms_endpoint_not_allowed before any KMS request', async () => {
    const res = await stack.call('POST', '/api/v1/cckm/aws/upload-key', { token, body: { source_key_identifier: 'test-key', region: 'us-east-1', kms: 'kms' } });
    expect(res.status).toBe(202);
    await stack.startWorker({ KMS_ENDPOINT_HOSTS: AWS_KMS_ENDPOINT_HOSTS.join(',') });
    const job = await waitForJob(stack, token, res.body.id);
    expect(job).toMatchObject({ status: 'failed', error: { code: 'kms_endpoint_not_allowed' } });
    expect(job.attempts).toBe(1);
    expect(stack.emulator.callCount()).toBe(0);
  });

  it('when an API runs with a list that no longer allows a connection, then an upload naming it answers 422 at `kms`', async () => {
    const { KMS_ENDPOINT_HOSTS: _, ...narrowed } = stack.config;
    const api = await startApi({ ...narrowed, KMS_ENDPOINT_HOSTS: [...AWS_KMS_ENDPOINT_HOSTS] }, createLogger('silent'));
    try {
      const res = await fetch(`${api.url}/api/v1/cckm/aws/upload-key`, {
        method: 'POST',
        headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
        body: JSON.stringify({ source_key_identifier: 'test-key', region: 'us-east-1', kms: 'kms' }),
      });
      expect(res.status).toBe(422);
      expect(((await res.json()) as { errors: unknown }).errors).toEqual([{ path: 'kms', message: expect.stringContaining('KMS_ENDPOINT_HOSTS') }]);
    } finally {
      await api.close();
    }
  });
});

describe('regional KMS endpoints', () => {
  const REGIONAL = 'kms.<region>.emulator.test:*';
  let stack: TestStack;
  let token: string;
  let narrowed: Awaited<ReturnType<typeof startApi>>;
  const post = async (path: string, body: unknown) => {
    const res = await fetch(`${narrowed.url}${path}`, { method: 'POST', headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' }, body: JSON.stringify(body) });
    return { status: res.status, body: (await res.json()) as { errors?: unknown } };
  };
  beforeAll(async () => {
    // The stack's own API allows any host, as before a regional endpoint had to serve all of its connection's regions.
    stack = await startStack({ name: 'kms-endpoints-regional', worker: false, env: { KMS_ENDPOINT_HOSTS: '*' } });
    token = await stack.token('acme');
    await seedLocalKey(stack, token, 'test-key');
    await seedKms(stack, token, { name: 'old', regions: ['eu-west-1', 'us-east-1'], endpoint: 'http://kms.eu-west-1.emulator.test:4599' });
    const { KMS_ENDPOINT_HOSTS: _, ...config } = stack.config;
    narrowed = await startApi({ ...config, KMS_ENDPOINT_HOSTS: [REGIONAL] }, createLogger('silent'));
  });
  afterAll(async () => {
    await narrowed?.close();
    await stack?.close();
  });

  it("when a connection's regional endpoint is another region's than one of its regions, then 400 naming `endpoint` and that region; with its own region only, 201", async () => {
    const body = { name: 'regional', account_id: '123456789012', regions: ['eu-west-1', 'ap-south-1'], endpoint: 'http://kms.eu-west-1.emulator.test:4599' };
    const refused = await post('/api/v1/cckm/aws/kms', body);
    expect(refused.status).toBe(400);
    expect(refused.body.errors).toEqual([{ path: 'endpoint', message: expect.stringMatching(/of eu-west-1: it cannot serve ap-south-1 /) }]);
    expect((await post('/api/v1/cckm/aws/kms', { ...body, regions: ['eu-west-1'] })).status).toBe(201);
  });

  it('when an upload names a connection made before for a region its regional endpoint does not serve, then 422 at that item\'s `kms`, and nothing is enqueued', async () => {
    const item = (region: string) => ({ source_key_identifier: 'test-key', region, kms: 'old' });
    const single = await post('/api/v1/cckm/aws/upload-key', item('us-east-1'));
    expect(single.status).toBe(422);
    expect(single.body.errors).toEqual([{ path: 'kms', message: expect.stringMatching(/does not allow: A regional endpoint of eu-west-1: it cannot serve us-east-1 /) }]);
    const batch = await post('/api/v1/cckm/aws/upload-key/batch', { items: [item('eu-west-1'), item('us-east-1')] });
    expect(batch.status).toBe(422);
    expect(batch.body.errors).toEqual([{ path: 'items[1].kms', message: expect.stringContaining('of eu-west-1') }]);
    expect(await queuedJobs(stack)).toBe(0);
  });

  it('when a worker is given a job for a region its connection\'s regional endpoint does not serve, then the job fails with kms_endpoint_not_allowed before any KMS request', async () => {
    const res = await stack.call('POST', '/api/v1/cckm/aws/upload-key', { token, body: { source_key_identifier: 'test-key', region: 'us-east-1', kms: 'old' } });
    expect(res.status).toBe(202);
    await stack.startWorker({ KMS_ENDPOINT_HOSTS: REGIONAL });
    const job = await waitForJob(stack, token, res.body.id);
    expect(job).toMatchObject({ status: 'failed', error: { code: 'kms_endpoint_not_allowed', message: expect.stringContaining('of eu-west-1: it cannot serve us-east-1') } });
    // One attempt: refused before the client is made, not a DNS failure of the unresolvable host (retried).
    expect(job.attempts).toBe(1);
  });
});
