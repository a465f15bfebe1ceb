/**
 * `npm start`: the whole dev stack in one process, zero config. KMS emulator on loopback, API, one worker,
 * against REDIS_URL; seeds the local key `test-key` and the KMS connection `kms` and prints a bearer
 * token, so the spec's example request works as written. Without KEYFERRY_PREFIX the data lives under a
 * fresh prefix that is deleted on exit (the emulator's keys are in memory and go with it anyway).
 */
import { randomBytes } from 'node:crypto';
import { Redis } from 'ioredis';
import { startApi } from '../api/server.js';
import { signToken } from '../shared/auth.js';
import { loadConfigOrExit } from '../shared/config.js';
import { createLogger } from '../shared/logger.js';
import { deleteKeyspace } from '../shared/stores/keyspace.js';
import { startTracing } from '../shared/tracing.js';
import { startWorker } from '../worker/runner.js';
import { KmsEmulator } from './kms-emulator/emulator.js';

const DEV_ACCOUNT = process.env.DEV_ACCOUNT ?? 'kylo';
const EMULATOR_KEY_ID = 'AKIAKEYFERRYDEV00001';
const ephemeralPrefix = process.env.KEYFERRY_PREFIX === undefined;

const env = {
  ...process.env,
  KEYFERRY_PREFIX: process.env.KEYFERRY_PREFIX ?? `keyferry-dev-${randomBytes(3).toString('hex')}`,
  KEYFERRY_MASTER_KEY: process.env.KEYFERRY_MASTER_KEY ?? randomBytes(32).toString('hex'),
  JWT_SECRET: process.env.JWT_SECRET ?? randomBytes(32).toString('hex'),
  ALLOW_HTTP_KMS_ENDPOINT: process.env.ALLOW_HTTP_KMS_ENDPOINT ?? 'true',
  KMS_ENDPOINT_HOSTS: process.env.KMS_ENDPOINT_HOSTS ?? '127.0.0.1:*', // the emulator's
};
const config = loadConfigOrExit(env);
const logger = createLogger(config.LOG_LEVEL, 'keyferry-dev');

const emulator = new KmsEmulator({
  port: Number(process.env.KMS_EMULATOR_PORT ?? 4599),
  accounts: { [EMULATOR_KEY_ID]: '123456789012' },
});
await emulator.start();
// One process, one service name (OTEL_SERVICE_NAME overrides); only with OTEL_EXPORTER_OTLP_ENDPOINT set.
const tracing = await startTracing(config, 'keyferry-dev');
const api = await startApi(config, logger.child({ role: 'api' }));
const worker = await startWorker(config, logger.child({ role: 'worker' }));
const tokenOptions = { secret: config.JWT_SECRET, account: DEV_ACCOUNT, ttlSeconds: 12 * 3600, issuer: config.JWT_ISSUER, audience: config.JWT_AUDIENCE };
const token = await signToken(tokenOptions);
// For the queue dashboard only: a tenant token is not in the admin group.
const adminToken = await signToken({ ...tokenOptions, subject: `local|${DEV_ACCOUNT}|admin`, groups: ['admin'] });

async function seed(path: string, body: unknown): Promise<void> {
  const res = await fetch(`${api.url}${path}`, {
    method: 'POST',
    headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
  if (res.status !== 201 && res.status !== 409) throw new Error(`seeding ${path} failed: ${res.status} ${await res.text()}`);
}
await seed('/api/v1/vault/keys2', { name: 'test-key', algorithm: 'AES', size: 256 });
await seed('/api/v1/cckm/aws/kms', {
  name: 'kms',
  account_id: '123456789012',
  regions: ['ap-south-1', 'us-east-1', 'us-west-2', 'eu-west-1', 'eu-central-1'],
  aws_access_key_id: EMULATOR_KEY_ID,
  aws_secret_access_key: 'keyferry-dev-emulator-secret',
  endpoint: emulator.url,
});

console.log(`
keyferry dev stack
  API            ${api.url.replace('127.0.0.1', 'localhost')}   (port ${new URL(api.url).port})
  KMS emulator   ${emulator.url}
  Redis          ${config.REDIS_URL}   prefix ${config.KEYFERRY_PREFIX}${ephemeralPrefix ? ' (deleted on exit)' : ''}
  seeded         local key "test-key", KMS connection "kms" (account 123456789012)
  dashboard      ${api.url.replace('127.0.0.1', 'localhost')}/admin/login   (paste the admin token below)${tracing ? `\n  tracing        ${tracing.serviceName} → ${config.OTEL_EXPORTER_OTLP_ENDPOINT}` : ''}

export KEYFERRY_URL=${api.url}
export KEYFERRY_TOKEN=${token}
# admin token (queue dashboard): ${adminToken}

curl -s "$KEYFERRY_URL/api/v1/cckm/aws/upload-key" -H "Authorization: Bearer $KEYFERRY_TOKEN" \\
  -H 'Content-Type: application/json' -H 'Prefer: wait=10' \\
  --data-binary '{"source_key_identifier":"test-key","region":"ap-south-1","kms":"kms","aws_param":{"Alias":"test-upload-key-1","Tags":[{"TagKey":"key","TagValue":"value"}]}}'
`);

let stopping = false;
async function stop(): Promise<void> {
  if (stopping) return;
  stopping = true;
  await worker.close();
  await api.close();
  await emulator.close();
  await tracing?.shutdown();
  if (ephemeralPrefix) {
    const redis = new Redis(config.REDIS_URL);
    await deleteKeyspace(redis, config.KEYFERRY_PREFIX);
    redis.disconnect();
  }
  process.exit(0);
}
process.once('SIGINT', () => void stop());
process.once('SIGTERM', () => void stop());
