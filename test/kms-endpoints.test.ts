/**
 * KMS_ENDPOINT_HOSTS: a KMS connection's endpoint must name AWS KMS's own hosts or one the operator lists,
 * since whoever answers GetParametersForImport chooses the key the material is wrapped under.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadConfig } from '../shared/config.js';
import { AWS_KMS_ENDPOINT_HOSTS, kmsEndpointAllowed } from '../shared/kms-endpoints.js';
import { seedKms, seedLocalKey, startStack, testEnv, waitForJob, type TestStack } from './helpers/stack.js';

describe('kmsEndpointAllowed', () => {
  it("when the default list is asked, then AWS KMS's regional, FIPS, China, dual-stack and VPC endpoints pass and hosts others can serve under AWS's domains do not", () => {
    const ok = [
      'https://kms.us-east-1.amazonaws.com',
      'https://KMS.eu-west-1.amazonaws.com/',
      'https://kms-fips.us-gov-west-1.amazonaws.com',
      'https://kms.cn-north-1.amazonaws.com.cn',
      'https://kms.ap-south-1.api.aws',
      'https://vpce-0a1b2c3d4e5f-abcdefgh.kms.us-east-1.vpce.amazonaws.com:443',
    ];
    const refused = [
      'https://abc123.execute-api.us-east-1.amazonaws.com', // API Gateway: anyone's
      'https://x.lambda-url.us-east-1.on.aws',
      'https://kms.us-east-1.amazonaws.com.evil.example',
      'https://evil-kms.us-east-1.amazonaws.com',
      'https://kms.us-east-1.evil.amazonaws.com',
      'https://vpce-1.vpce-svc-0123.us-east-1.vpce.amazonaws.com', // someone's PrivateLink service
      'https://127.0.0.1:4599',
      'not a url',
    ];
    for (const url of ok) expect(kmsEndpointAllowed(url, AWS_KMS_ENDPOINT_HOSTS), url).toBe(true);
    for (const url of refused) expect(kmsEndpointAllowed(url, AWS_KMS_ENDPOINT_HOSTS), url).toBe(false);
    expect(kmsEndpointAllowed('http://127.0.0.1:4599', ['127.0.0.1'])).toBe(true);
    expect(kmsEndpointAllowed('https://anything.example', ['*'])).toBe(true);
  });

  it('when KMS_ENDPOINT_HOSTS is unset, then it is the AWS list; a bad pattern stops the start', () => {
    const { KMS_ENDPOINT_HOSTS: _, ...env } = testEnv('kms-endpoints');
    expect(loadConfig(env).KMS_ENDPOINT_HOSTS).toEqual([...AWS_KMS_ENDPOINT_HOSTS]);
    expect(loadConfig({ ...env, KMS_ENDPOINT_HOSTS: 'kms.*.amazonaws.com, Emulator' }).KMS_ENDPOINT_HOSTS).toEqual(['kms.*.amazonaws.com', 'emulator']);
    expect(() => loadConfig({ ...env, KMS_ENDPOINT_HOSTS: 'https://kms.example' })).toThrow(/KMS_ENDPOINT_HOSTS/);
    expect(() => loadConfig({ ...env, KMS_ENDPOINT_HOSTS: 'kms.*.amazon*.com' })).toThrow(/KMS_ENDPOINT_HOSTS/);
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
});
