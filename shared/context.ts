import type { Config } from './config.js';
import { SecretBox } from './crypto.js';
import type { RedisClient } from './redis.js';
import type { KmsConnection, LocalKey, PolicyTemplate } from './resources.js';
import type { DsmConnection, HsmConnection } from './source-connections.js';
import { BatchStore } from './stores/batch-store.js';
import { JobStore } from './stores/job-store.js';
import { Keyspace } from './stores/keyspace.js';
import { ResourceStore } from './stores/resource-store.js';
import { UploadedKeyStore } from './stores/uploaded-key-store.js';

/** The stores both roles share, wired by hand in one place. */
export interface Stores {
  keys: Keyspace;
  box: SecretBox;
  jobs: JobStore;
  batches: BatchStore;
  uploadedKeys: UploadedKeyStore;
  kmsConnections: ResourceStore<KmsConnection>;
  templates: ResourceStore<PolicyTemplate>;
  localKeys: ResourceStore<LocalKey>;
  hsmConnections: ResourceStore<HsmConnection>;
  dsmConnections: ResourceStore<DsmConnection>;
}

export function createStores(
  config: Pick<Config, 'KEYFERRY_PREFIX' | 'KEYFERRY_MASTER_KEY' | 'KEYFERRY_MASTER_KEY_PREVIOUS' | 'RECORD_RETENTION_DAYS'>,
  redis: RedisClient,
): Stores {
  const keys = new Keyspace(config.KEYFERRY_PREFIX);
  return {
    keys,
    box: new SecretBox(config.KEYFERRY_MASTER_KEY, config.KEYFERRY_MASTER_KEY_PREVIOUS),
    jobs: new JobStore(redis, keys, Math.round(config.RECORD_RETENTION_DAYS * 86_400)),
    batches: new BatchStore(redis, keys),
    uploadedKeys: new UploadedKeyStore(redis, keys),
    kmsConnections: new ResourceStore<KmsConnection>(redis, keys, 'kms', 'KMS connection'),
    templates: new ResourceStore<PolicyTemplate>(redis, keys, 'templates', 'policy template'),
    localKeys: new ResourceStore<LocalKey>(redis, keys, 'localkeys', 'local key'),
    hsmConnections: new ResourceStore<HsmConnection>(redis, keys, 'hsm', 'HSM connection'),
    dsmConnections: new ResourceStore<DsmConnection>(redis, keys, 'dsm', 'DSM (KMIP) connection'),
  };
}
