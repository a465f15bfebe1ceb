import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { EncryptCommand, KMSClient } from '@aws-sdk/client-kms';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { decryptEmulatorCiphertext } from './kms-emulator/emulator.js';
import { EMULATOR_ACCESS_KEY, EMULATOR_SECRET_KEY, seedKms, seedLocalKey, startStack, waitForJob, type TestStack } from './helpers/stack.js';
import { monitorCommands, redisValuesUnder } from './helpers/redis-dump.js';
import { Keyspace } from '../shared/stores/keyspace.js';

const spec = (f: string) => JSON.parse(readFileSync(new URL(`./fixtures/spec-${f}`, import.meta.url), 'utf8')) as Record<string, any>;
const exampleRequest = spec('example-request.json');
const exampleResponse = spec('example-response.json');

let stack: TestStack;
let token: string;
const materials: Buffer[] = [];

/** A local key with known material, remembered for the leak scan at the end. */
async function knownKey(name: string) {
  const material = randomBytes(32);
  materials.push(material);
  const key = await seedLocalKey(stack, token, name, material.toString('hex'));
  return { ...key, material };
}

const upload = (body: Record<string, unknown>, headers: Record<string, string> = {}) =>
  stack.call('POST', '/api/v1/cckm/aws/upload-key', { token, body, headers });

/** The job resources in a job's event stream: one per write that changed its status or step. */
async function jobChanges(jobId: string) {
  const events = await stack.redis.xrange(new Keyspace(stack.config.KEYFERRY_PREFIX).jobEvents(jobId), '-', '+');
  return events.map(([, fields]) => JSON.parse(fields[fields.indexOf('data') + 1] as string) as { status: string; step: string });
}

const jobTagged = (jobId: string) => stack.emulator.keys().filter((k) => k.tags.some((t) => t.TagKey === 'keyferry:job-id' && t.TagValue === jobId));

beforeAll(async () => {
  stack = await startStack({ name: 'e2e', emulator: { recordRequests: true } });
  token = await stack.token('kylo');
  await seedKms(stack, token);
  await knownKey('test-key');
});
afterAll(async () => {
  await stack?.close();
});

describe('upload-key end to end (API → BullMQ → worker → KMS emulator)', () => {
  it('when the spec example is posted, then 202 + Location, and the polled result matches the spec response field by field', async () => {
    const res = await upload(exampleRequest);
    expect(res.status).toBe(202);
    expect(res.headers.get('location')).toBe(`/api/v1/jobs/${res.body.id}`);
    expect(Number(res.headers.get('retry-after'))).toBeGreaterThan(0);
    expect(res.headers.get('content-type')).toBe('application/json; charset=utf-8');
    expect(res.headers.get('x-request-id')).toBeTruthy();
    // The answer to a POST carries no ETag: no cache can use one (sendAccepted writes it without Express's res.json).
    expect(res.headers.get('etag')).toBeNull();
    expect(res.body).toMatchObject({ type: 'upload-key', status: 'queued', attempts: 0, error: null, result: null, batch_id: null });

    const job = await waitForJob(stack, token, res.body.id);
    expect(job.status).toBe('succeeded');
    expect(job.attempts).toBe(1);
    const result = job.result;

    // Same fields, same types as the spec's example response.
    expect(Object.keys(result).sort()).toEqual(Object.keys(exampleResponse).sort());
    expect(Object.keys(result.aws_param).sort()).toEqual(Object.keys(exampleResponse.aws_param).sort());
    for (const [k, v] of Object.entries(exampleResponse)) expect(typeof result[k], k).toBe(typeof v);
    // Values that do not depend on ids or clocks are equal.
    const sameValues = ['kms', 'rotation_status', 'local_key_name', 'cloud_name', 'key_type', 'basic_view_enabled', 'region', 'gone', 'key_material_origin'];
    for (const k of sameValues) expect(result[k], k).toEqual(exampleResponse[k]);
    const awsSame = ['AWSAccountId', 'CustomerMasterKeySpec', 'Enabled', 'EncryptionAlgorithms', 'KeyManager', 'KeyState', 'KeyUsage', 'Origin', 'Policy', 'Alias', 'Tags', 'KeyRotationEnabled', 'ExpirationModel'];
    for (const k of awsSame) expect(result.aws_param[k], `aws_param.${k}`).toEqual(exampleResponse.aws_param[k]);
    expect(result.aws_param.Arn).toMatch(/^arn:aws:kms:ap-south-1:123456789012:key\/[0-9a-f-]{36}$/);
    expect(result.aws_param.Arn.endsWith(result.aws_param.KeyID)).toBe(true);
    expect(result.aws_param.CreationDate).toMatch(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/);
    expect(result.local_key_id).toMatch(/^[0-9a-f]{64}$/);

    const key = await stack.call('GET', `/api/v1/cckm/aws/keys/${result.id}`, { token });
    expect(key.status).toBe(200);
    expect(key.body).toEqual(result);
    expect(jobTagged(job.id)).toHaveLength(1);
  });

  it('when Prefer: wait is sent, then the answer is 201 with the key resource and Preference-Applied', async () => {
    const res = await upload({ ...exampleRequest, aws_param: { Alias: 'waited-key' } }, { prefer: 'wait=20' });
    expect(res.status).toBe(201);
    expect(res.headers.get('preference-applied')).toBe('wait=20');
    expect(res.headers.get('location')).toBe(`/api/v1/cckm/aws/keys/${res.body.id}`);
    expect(res.body.aws_param).toMatchObject({ KeyState: 'Enabled', Origin: 'EXTERNAL', Alias: ['alias/waited-key'] });
  });

  it('when a key is uploaded, then the material in KMS is the source material (Encrypt in KMS, decrypt with the source bytes)', async () => {
    const src = await knownKey('proof-key');
    const res = await upload({ source_key_identifier: 'proof-key', region: 'us-east-1', kms: 'kms' }, { prefer: 'wait=20' });
    expect(res.status).toBe(201);
    const kms = new KMSClient({ region: 'us-east-1', endpoint: stack.emulator.url, credentials: { accessKeyId: EMULATOR_ACCESS_KEY, secretAccessKey: EMULATOR_SECRET_KEY }, maxAttempts: 1 });
    const plaintext = Buffer.from('keyferry proves the material');
    const enc = await kms.send(new EncryptCommand({ KeyId: res.body.aws_param.KeyID, Plaintext: plaintext }));
    kms.destroy();
    expect(decryptEmulatorCiphertext(Buffer.from(enc.CiphertextBlob as Uint8Array), src.material)).toEqual(plaintext);
    expect(() => decryptEmulatorCiphertext(Buffer.from(enc.CiphertextBlob as Uint8Array), randomBytes(32))).toThrow();
  });

  it('when the key expires, then it is imported with KEY_MATERIAL_EXPIRES and its ValidTo', async () => {
    const validTo = new Date(Date.now() + 30 * 86_400_000);
    validTo.setUTCMilliseconds(0);
    const res = await upload({ ...exampleRequest, KeyExpiration: true, aws_param: { ValidTo: validTo.toISOString() } }, { prefer: 'wait=20' });
    expect(res.status).toBe(201);
    expect(res.body.aws_param.ExpirationModel).toBe('KEY_MATERIAL_EXPIRES');
    expect(Date.parse(res.body.aws_param.ValidTo)).toBe(validTo.getTime());
  });

  it('when the request names as many tags as it may (49), then the key gets them and keyferry\'s job tag: the 50 AWS allows', async () => {
    const tags = Array.from({ length: 49 }, (_, i) => ({ TagKey: `team-${i}`, TagValue: `v${i}` }));
    const res = await upload({ ...exampleRequest, aws_param: { Tags: tags } }, { prefer: 'wait=20' });
    expect(res.status).toBe(201);
    expect(res.body.aws_param.Tags).toEqual(tags);
    const key = stack.emulator.keys().find((k) => k.arn === res.body.aws_param.Arn);
    expect(key?.tags).toHaveLength(50);
  });

  it('when principal lists are given, then the key policy in KMS names them', async () => {
    const res = await upload({ ...exampleRequest, aws_param: { Description: 'with principals' }, key_admins: ['alice'], external_accounts: ['444455556666'] }, { prefer: 'wait=20' });
    expect(res.status).toBe(201);
    const sids = res.body.aws_param.Policy.Statement.map((s: { Sid: string }) => s.Sid);
    expect(sids).toEqual(['Enable IAM User Permissions', 'Allow access for Key Administrators', 'Allow use of the key', 'Allow attachment of persistent resources']);
    expect(res.body.aws_param.Description).toBe('with principals');
  });

  it('when a policy template is named, then the key gets the template policy', async () => {
    const policy = { Version: '2012-10-17', Id: 'from-template', Statement: [{ Sid: 'Root', Effect: 'Allow', Principal: { AWS: 'arn:aws:iam::123456789012:root' }, Action: 'kms:*', Resource: '*' }] };
    const t = await stack.call('POST', '/api/v1/cckm/aws/templates', { token, body: { name: 'tpl-1', policy } });
    expect(t.status).toBe(201);
    const res = await upload({ ...exampleRequest, aws_param: {}, policytemplate: 'tpl-1' }, { prefer: 'wait=20' });
    expect(res.status).toBe(201);
    expect(res.body.aws_param.Policy).toEqual(policy);
  });

  it('when KMS throttles CreateKey twice, then the job succeeds on attempt 3 with one key', async () => {
    stack.emulator.injectFault({ op: 'CreateKey', error: 'ThrottlingException', count: 2 });
    const listKeys = stack.emulator.callCount('ListKeys');
    const res = await upload({ ...exampleRequest, aws_param: { Alias: 'after-throttle' } });
    const job = await waitForJob(stack, token, res.body.id);
    expect(job.status).toBe('succeeded');
    expect(job.attempts).toBe(3);
    expect(jobTagged(job.id)).toHaveLength(1);
    // A refused CreateKey made no key, so the retries do not look for one by its tag.
    expect(stack.emulator.callCount('ListKeys')).toBe(listKeys);
  });

  it('when ImportKeyMaterial fails with a 500 once, then the retry resumes and no second key is created', async () => {
    stack.emulator.injectFault({ op: 'ImportKeyMaterial', error: 'KMSInternalException', count: 1 });
    const before = stack.emulator.callCount('CreateKey');
    const paramsBefore = stack.emulator.callCount('GetParametersForImport');
    const res = await upload({ ...exampleRequest, aws_param: { Alias: 'after-500' } });
    const job = await waitForJob(stack, token, res.body.id);
    expect(job.status).toBe('succeeded');
    expect(job.attempts).toBe(2);
    expect(stack.emulator.callCount('CreateKey') - before).toBe(1);
    // The import-parameters checkpoint (on its way during the wrap) settled before the failure: the retry reuses them.
    expect(stack.emulator.callCount('GetParametersForImport') - paramsBefore).toBe(1);
    expect(jobTagged(job.id)).toHaveLength(1);
    expect(jobTagged(job.id)[0]?.keyState).toBe('Enabled');
  });

  // CreateAlias succeeds while GetParametersForImport fails: the alias is recorded before the failure, and the
  // import checkpoint goes out with the describe requests and is settled before their failure is recorded.
  it('when GetParametersForImport fails with a 500 once, then the retry does not create the alias again', async () => {
    stack.emulator.injectFault({ op: 'GetParametersForImport', error: 'KMSInternalException', count: 1 });
    const before = { alias: stack.emulator.callCount('CreateAlias'), lists: stack.emulator.callCount('ListAliases') };
    const res = await upload({ ...exampleRequest, aws_param: { Alias: 'params-500' } });
    const job = await waitForJob(stack, token, res.body.id);
    expect(job).toMatchObject({ status: 'succeeded', attempts: 2 });
    expect(stack.emulator.callCount('CreateAlias') - before.alias).toBe(1);
    expect(stack.emulator.callCount('ListAliases') - before.lists).toBe(1); // the describe step's only
    expect(jobTagged(job.id)[0]?.aliases).toEqual(['alias/params-500']);
  });

  it('when DescribeKey fails with a 500 once, then the retry does not import again', async () => {
    stack.emulator.injectFault({ op: 'DescribeKey', error: 'KMSInternalException', count: 1 });
    const before = stack.emulator.callCount('ImportKeyMaterial');
    const res = await upload({ ...exampleRequest, aws_param: { Alias: 'describe-500' } });
    const job = await waitForJob(stack, token, res.body.id);
    expect(job).toMatchObject({ status: 'succeeded', attempts: 2 });
    expect(stack.emulator.callCount('ImportKeyMaterial') - before).toBe(1);
    expect(jobTagged(job.id)[0]?.keyState).toBe('Enabled');
  });

  it('when the source key does not exist, then the job fails at once with a stable code and no retry', async () => {
    const listKeys = stack.emulator.callCount('ListKeys');
    const res = await upload({ ...exampleRequest, source_key_identifier: 'no-such-key' });
    const job = await waitForJob(stack, token, res.body.id);
    expect(job).toMatchObject({ status: 'failed', attempts: 1, step: 'resolve', error: { code: 'source_key_not_found', retryable: false } });
    expect(jobTagged(job.id)).toHaveLength(0);
    // The create_key intent that the start write recorded ahead was taken back: the clean-up did not look for a key.
    expect(stack.emulator.callCount('ListKeys')).toBe(listKeys);
  });

  it('when a job succeeds on a single Redis, then its key resource is written inside the script that records the success', async () => {
    const keys = new Keyspace(stack.config.KEYFERRY_PREFIX);
    const seen: { args: string[]; client: string }[] = [];
    const stop = await monitorCommands(stack.config.REDIS_URL, (args, client) => seen.push({ args, client }));
    let job;
    try {
      const res = await upload({ ...exampleRequest, aws_param: { Alias: 'resource-with-record' } });
      job = await waitForJob(stack, token, res.body.id);
    } finally {
      stop();
    }
    expect(job.status).toBe('succeeded');
    const resourceSet = seen.findIndex((c) => c.args[0]?.toLowerCase() === 'set' && c.args[1] === keys.uploadedKey(String(job.result?.id)));
    const recordSet = seen.findIndex((c) => c.args[0]?.toLowerCase() === 'set' && c.args[1] === keys.job(job.id) && (c.args[2] ?? '').includes('"status":"succeeded"'));
    expect(resourceSet).toBeGreaterThanOrEqual(0);
    expect(recordSet).toBeGreaterThan(resourceSet);
    // Both inside one script: no command from a client came between them.
    expect(seen.slice(resourceSet, recordSet + 1).every((c) => c.client === 'lua')).toBe(true);
    expect(seen.filter((c) => c.args[1] === keys.uploadedKey(String(job.result?.id)))).toHaveLength(1);
  });

  it('when a local-store job starts, then its start write already records the create_key intent', async () => {
    const res = await upload({ ...exampleRequest, aws_param: { Alias: 'intent-ahead' } });
    const job = await waitForJob(stack, token, res.body.id);
    expect(job.status).toBe('succeeded');
    const changes = await jobChanges(job.id);
    const firstRunning = changes.find((c) => c.status === 'running');
    expect(firstRunning?.step).toBe('create_key');
    expect(changes.map((c) => c.step)).not.toContain('resolve');
  });

  it('when a local-store job with an alias runs, then CreateAlias and GetParametersForImport go out together, and its record shows import while wrapping', async () => {
    const latencyMs = 200;
    stack.emulator.setLatency(latencyMs);
    let job;
    try {
      const res = await upload({ ...exampleRequest, aws_param: { Alias: 'alias-with-params' } });
      job = await waitForJob(stack, token, res.body.id);
    } finally {
      stack.emulator.setLatency(0);
    }
    expect(job.status).toBe('succeeded');
    // One after the other, the second would arrive a whole KMS round trip after the first.
    const lastArrival = (op: string) => stack.emulator.requests().filter((r) => r.op === op).at(-1)?.at ?? NaN;
    expect(Math.abs(lastArrival('GetParametersForImport') - lastArrival('CreateAlias'))).toBeLessThan(latencyMs);
    // One write per change of step: neither get_import_params (it goes with create_alias) nor wrap is entered by a write.
    const running = (await jobChanges(job.id)).filter((c) => c.status === 'running').map((c) => c.step);
    expect(running).toEqual(['create_key', 'create_alias', 'import', 'describe']);
  });

  it('when the wrap of a local-store key fails, then the job fails at wrap, not at the import its record showed', async () => {
    await knownKey('unsealable');
    const keys = new Keyspace(stack.config.KEYFERRY_PREFIX);
    const { id } = (await stack.call('GET', '/api/v1/vault/keys2/unsealable', { token })).body as { id: string };
    const hash = keys.resources('kylo', 'localkeys');
    const stored = JSON.parse((await stack.redis.hget(hash, id)) as string) as { material_sealed: string };
    // Sealed under a master key the worker does not have: opening it, in the wrap, fails.
    stored.material_sealed = stored.material_sealed.replace(/^kf1\.[^.]+\./, 'kf1.00000000.');
    await stack.redis.hset(hash, id, JSON.stringify(stored));
    const res = await upload({ ...exampleRequest, source_key_identifier: 'unsealable', aws_param: { Alias: 'unsealable' } });
    const job = await waitForJob(stack, token, res.body.id);
    expect(job).toMatchObject({ status: 'failed', step: 'wrap', deletion_scheduled_for: expect.any(String) });
    expect(stack.emulator.requests().filter((r) => r.op === 'ImportKeyMaterial' && r.at >= Date.parse(job.created_at))).toHaveLength(0);
    expect(jobTagged(job.id)[0]?.aliases).toEqual([]);
  });

  it('when the alias names another key, then the job fails alias_taken and its new key is scheduled for deletion', async () => {
    const first = await upload({ ...exampleRequest, aws_param: { Alias: 'taken-alias' } }, { prefer: 'wait=20' });
    expect(first.status).toBe(201);
    const res = await upload({ ...exampleRequest, aws_param: { Alias: 'taken-alias' } }, { prefer: 'wait=20' });
    expect(res.status).toBe(422);
    expect(res.headers.get('content-type')).toMatch(/application\/problem\+json/);
    expect(res.body.code).toBe('alias_taken');
    const job = res.body.job;
    expect(job).toMatchObject({ status: 'failed', attempts: 1 });
    expect(job.deletion_scheduled_for).toEqual(expect.any(String));
    expect(jobTagged(job.id).map((k) => k.keyState)).toEqual(['PendingDeletion']);
  });

  it('when CreateAlias is refused and the clean-up cannot look for the alias, then the key is still scheduled for deletion', async () => {
    stack.emulator.injectFault({ op: 'CreateAlias', error: 'AccessDeniedException', status: 400, count: 1 });
    // The clean-up's ListAliases (the record does not say the alias was made, so it looks) fails.
    stack.emulator.injectFault({ op: 'ListAliases', error: 'KMSInternalException', status: 500, count: 1 });
    const res = await upload({ ...exampleRequest, aws_param: { Alias: 'alias-denied' } });
    const job = await waitForJob(stack, token, res.body.id);
    stack.emulator.clearFaults();
    expect(job).toMatchObject({ status: 'failed', step: 'create_alias', error: { code: 'aws_access_denied' }, deletion_scheduled_for: expect.any(String) });
    expect(jobTagged(job.id).map((k) => k.keyState)).toEqual(['PendingDeletion']);
  });

  it('when retries run out on a retryable error, then the job fails with retryable true after max_attempts', async () => {
    stack.emulator.injectFault({ op: 'GetParametersForImport', error: 'DependencyTimeoutException', count: 5 });
    const res = await upload({ ...exampleRequest, aws_param: { Alias: 'never-imported' } });
    const job = await waitForJob(stack, token, res.body.id);
    expect(job).toMatchObject({ status: 'failed', attempts: 5, max_attempts: 5, error: { code: 'aws_unavailable', retryable: true } });
    expect(jobTagged(job.id).map((k) => k.keyState)).toEqual(['PendingDeletion']);
    // Its alias was deleted with it, so the name is free for the next upload.
    expect(jobTagged(job.id)[0]?.aliases).toEqual([]);
    const again = await upload({ ...exampleRequest, aws_param: { Alias: 'never-imported' } }, { prefer: 'wait=20' });
    expect(again.status).toBe(201);
  });

  it('after all of the above, then no Redis value and no log line holds key material or the AWS secret', async () => {
    const values = await redisValuesUnder(stack.redis, stack.config.KEYFERRY_PREFIX);
    expect(values.length).toBeGreaterThan(10);
    const haystacks = [...values, ...stack.logs.lines];
    expect(stack.logs.lines.length).toBeGreaterThan(10);
    const needles = [EMULATOR_SECRET_KEY, ...materials.flatMap((m) => [m.toString('hex'), m.toString('base64'), m.toString('base64url')])];
    for (const needle of needles) {
      for (const h of haystacks) expect(h.includes(needle), `found secret material in: ${h.slice(0, 120)}`).toBe(false);
    }
  });
});
