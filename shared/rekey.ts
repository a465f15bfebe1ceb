import type { Stores } from './context.js';
import { defineScript, scanKeys, type RedisClient } from './redis.js';
import { kmsSecretContext, localKeyContext } from './resources.js';
import { dsmKeyContext, hsmPinContext } from './source-connections.js';
import { WebhookSecretStore } from './stores/webhook-secret-store.js';

export interface RekeyCounts {
  kms_connections: number;
  local_keys: number;
  hsm_connections: number;
  dsm_connections: number;
  webhook_secrets: number;
}

/** Account resources holding one sealed value each: where it is in the record, and its sealing context. */
const SEALED_FIELDS: {
  kind: string;
  count: Exclude<keyof RekeyCounts, 'webhook_secrets'>;
  holder: (record: Record<string, unknown>) => Record<string, unknown> | undefined;
  field: string;
  context: (account: string, id: string) => string;
}[] = [
  // A KMS connection's secret sits in its credentials (absent for the default credential chain).
  { kind: 'kms', count: 'kms_connections', holder: (r) => r.credentials as Record<string, unknown> | undefined, field: 'secret_sealed', context: kmsSecretContext },
  { kind: 'localkeys', count: 'local_keys', holder: (r) => r, field: 'material_sealed', context: localKeyContext },
  { kind: 'hsm', count: 'hsm_connections', holder: (r) => r, field: 'pin_sealed', context: hsmPinContext },
  { kind: 'dsm', count: 'dsm_connections', holder: (r) => r, field: 'client_key_sealed', context: dsmKeyContext },
];

/**
 * Sets each field of the hash KEYS[1] named in ARGV (triples: field, the value read, the new value) only if it
 * still holds the value read; returns how many were set. A field written meanwhile (a webhook-secret rotation,
 * a resource updated by a running API with the new master key) keeps what was written.
 */
const SET_IF_UNCHANGED = `
local n = 0
for i = 1, #ARGV, 3 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
    n = n + 1
  end
end
return n`;

/** Writes `next` to each field that still holds its `read` value (SET_IF_UNCHANGED); the number written. */
export async function setFieldsIfUnchanged(redis: RedisClient, key: string, changes: { field: string; read: string; next: string }[]): Promise<number> {
  if (changes.length === 0) return 0;
  const run = defineScript(redis, 'hset_if_unchanged', SET_IF_UNCHANGED);
  return Number(await run([key], changes.flatMap((c) => [c.field, c.read, c.next])));
}

/**
 * Re-seals every secret at rest under the current master key: KMS connection secrets, local key material,
 * HSM PINs, KMIP client keys and webhook secrets. Run it after setting a new KEYFERRY_MASTER_KEY with the old one in
 * KEYFERRY_MASTER_KEY_PREVIOUS; once it has run, the old key can be dropped. Values already under the
 * current key are left alone, so running it twice is harmless. On a Redis Cluster every master is scanned.
 * Each value is written back only if it is still the one read (setFieldsIfUnchanged), so the running API and
 * workers may go on writing meanwhile: what they write is sealed under the current key already.
 */
export async function rekeyAll(redis: RedisClient, stores: Stores): Promise<RekeyCounts> {
  const counts: RekeyCounts = { kms_connections: 0, local_keys: 0, hsm_connections: 0, dsm_connections: 0, webhook_secrets: 0 };
  const { box, keys } = stores;
  for (const key of await scanKeys(redis, `${keys.prefix}:acct:{*}:*`)) {
    const account = /:acct:\{(.+)\}:/.exec(key)?.[1];
    if (account === undefined) continue;
    const sealedField = SEALED_FIELDS.find((f) => key === keys.resources(account, f.kind));
    if (sealedField) {
      counts[sealedField.count] += await resealHash<Record<string, unknown> & { id: string }>(redis, key, (record) => {
        const holder = sealedField.holder(record);
        const sealed = holder?.[sealedField.field];
        if (typeof sealed !== 'string') return false;
        const next = box.reseal(sealed, sealedField.context(account, record.id));
        if (next === sealed) return false;
        (holder as Record<string, unknown>)[sealedField.field] = next;
        return true;
      });
    } else if (key === keys.webhookSecret(account)) {
      const stored = await redis.hgetall(key);
      const changes: { field: string; read: string; next: string }[] = [];
      for (const field of ['current', 'previous'] as const) {
        const sealed = stored[field];
        if (!sealed) continue;
        const next = box.reseal(sealed, WebhookSecretStore.context(account));
        if (next !== sealed) changes.push({ field, read: sealed, next });
      }
      if ((await setFieldsIfUnchanged(redis, key, changes)) > 0) counts.webhook_secrets++;
    }
  }
  return counts;
}

/** Applies `reseal` to each JSON record of a hash; writes back those it changed and no one wrote meanwhile; returns how many. */
async function resealHash<T>(redis: RedisClient, key: string, reseal: (record: T) => boolean): Promise<number> {
  const changes: { field: string; read: string; next: string }[] = [];
  for (const [field, raw] of Object.entries(await redis.hgetall(key))) {
    const record = JSON.parse(raw) as T;
    if (reseal(record)) changes.push({ field, read: raw, next: JSON.stringify(record) });
  }
  return setFieldsIfUnchanged(redis, key, changes);
}
