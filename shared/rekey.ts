import type { Redis } from 'ioredis';
import type { Stores } from './context.js';
import { kmsSecretContext, localKeyContext, type KmsConnection, type LocalKey } from './resources.js';
import { dsmKeyContext, hsmPinContext, type DsmConnection, type HsmConnection } from './source-connections.js';
import { WebhookSecretStore } from './stores/webhook-secret-store.js';

export interface RekeyCounts {
  kms_connections: number;
  local_keys: number;
  hsm_connections: number;
  dsm_connections: number;
  webhook_secrets: number;
}

/**
 * Re-seals every secret at rest under the current master key: KMS connection secrets, local key material,
 * HSM PINs, KMIP client keys and webhook secrets. Run it after setting a new KEYFERRY_MASTER_KEY with the old one in
 * KEYFERRY_MASTER_KEY_PREVIOUS; once it has run, the old key can be dropped. Values already under the
 * current key are left alone, so running it twice is harmless. (SCAN: one Redis, not a cluster.)
 */
export async function rekeyAll(redis: Redis, stores: Stores): Promise<RekeyCounts> {
  const counts: RekeyCounts = { kms_connections: 0, local_keys: 0, hsm_connections: 0, dsm_connections: 0, webhook_secrets: 0 };
  const { box, keys } = stores;
  let cursor = '0';
  do {
    const [next, found] = await redis.scan(cursor, 'MATCH', `${keys.prefix}:acct:{*}:*`, 'COUNT', 1000);
    cursor = next;
    for (const key of found) {
      const account = /:acct:\{(.+)\}:/.exec(key)?.[1];
      if (account === undefined) continue;
      if (key === keys.resources(account, 'kms')) {
        counts.kms_connections += await resealHash<KmsConnection>(redis, key, (c) => {
          if (c.credentials.type !== 'access_key') return false;
          const next = box.reseal(c.credentials.secret_sealed, kmsSecretContext(account, c.id));
          if (next === c.credentials.secret_sealed) return false;
          c.credentials.secret_sealed = next;
          return true;
        });
      } else if (key === keys.resources(account, 'localkeys')) {
        counts.local_keys += await resealHash<LocalKey>(redis, key, (k) => {
          const next = box.reseal(k.material_sealed, localKeyContext(account, k.id));
          if (next === k.material_sealed) return false;
          k.material_sealed = next;
          return true;
        });
      } else if (key === keys.resources(account, 'hsm')) {
        counts.hsm_connections += await resealHash<HsmConnection>(redis, key, (c) => {
          const next = box.reseal(c.pin_sealed, hsmPinContext(account, c.id));
          if (next === c.pin_sealed) return false;
          c.pin_sealed = next;
          return true;
        });
      } else if (key === keys.resources(account, 'dsm')) {
        counts.dsm_connections += await resealHash<DsmConnection>(redis, key, (c) => {
          const next = box.reseal(c.client_key_sealed, dsmKeyContext(account, c.id));
          if (next === c.client_key_sealed) return false;
          c.client_key_sealed = next;
          return true;
        });
      } else if (key === keys.webhookSecret(account)) {
        const stored = await redis.hgetall(key);
        const changes: Record<string, string> = {};
        for (const field of ['current', 'previous'] as const) {
          const sealed = stored[field];
          if (!sealed) continue;
          const next = box.reseal(sealed, WebhookSecretStore.context(account));
          if (next !== sealed) changes[field] = next;
        }
        if (Object.keys(changes).length > 0) {
          await redis.hset(key, changes);
          counts.webhook_secrets++;
        }
      }
    }
  } while (cursor !== '0');
  return counts;
}

/** Applies `reseal` to each JSON record of a hash; writes back those it changed; returns how many. */
async function resealHash<T>(redis: Redis, key: string, reseal: (record: T) => boolean): Promise<number> {
  const changed: Record<string, string> = {};
  for (const [field, raw] of Object.entries(await redis.hgetall(key))) {
    const record = JSON.parse(raw) as T;
    if (reseal(record)) changed[field] = JSON.stringify(record);
  }
  if (Object.keys(changed).length > 0) await redis.hset(key, changed);
  return Object.keys(changed).length;
}
