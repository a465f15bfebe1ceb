import { createPublicKey } from 'node:crypto';
import type { RsaOAEP } from 'pkcs11js';
import type { Config } from '../../shared/config.js';
import type { WrappingAlgorithm } from '../../shared/crypto.js';
import { PipelineError } from '../../shared/errors.js';
import { hsmPinContext, hsmTokenAllowed, type HsmConnection } from '../../shared/source-connections.js';
import type { SourceDeps, SourceKey, SourceProvider } from './index.js';
import { ckrName, classifyPkcs11 } from './pkcs11-errors.js';
import type { Pkcs11Binding } from './pkcs11-library.js';
import { Pkcs11SessionPool, type Handle } from './pkcs11-pool.js';

/*
 * The `hsm-luna` tier: AES-256 keys held in an HSM reached through PKCS#11. The key never leaves the HSM in
 * clear: AWS's wrapping public key is imported into the session as a session object and the HSM wraps the
 * key under it with CKM_RSA_PKCS_OAEP (C_WrapKey). pkcs11js calls are synchronous: each HSM call blocks this
 * worker's event loop for as long as the HSM takes to answer (milliseconds for a local or LAN HSM).
 */

const CKZ_DATA_SPECIFIED = 1; // not exported by pkcs11js
const HEX_ID = /^(?:[0-9a-fA-F]{2})+$/;
/** More matches than this are reported as "several"; C_FindObjects never needs to return them all. */
const FIND_LIMIT = 16;

interface FoundKey {
  handle: Handle;
  /** CKA_ID as hex; '' when the key has none. */
  idHex: string;
  label: string;
}

/** Pools (one per HSM connection in use) a worker process keeps at most; the least recently used goes first. */
export const MAX_HSM_POOLS = 64;
/** A pool unused for this long is closed: its sessions (and their login) do not outlive their use. */
export const HSM_POOL_IDLE_MS = 5 * 60_000;

export interface HsmPoolLimits {
  /** At most this many pools (default MAX_HSM_POOLS); opening one more closes the least recently used. */
  maxPools?: number;
  /** Pools unused for this long (default HSM_POOL_IDLE_MS) are closed, by an unref'd timer and on each use. */
  idleMs?: number;
  /** The clock pools' last use is measured with (tests). */
  now?: () => number;
}

export interface HsmProviderDeps extends Omit<SourceDeps, 'config'> {
  /**
   * HSM_TOKENS is read on each job: absent (a config not carrying it), no token is allowed. It is not in
   * SourceDeps' Pick, so a narrowed config object fails closed rather than open.
   */
  config: Pick<Config, 'HSM_LIBRARIES'> & Partial<Pick<Config, 'HSM_TOKENS'>>;
}

interface PoolEntry {
  connectionId: string;
  /** A connection recorded again (new PIN, library, token) gets a new pool. */
  fingerprint: string;
  pool: Promise<Pkcs11SessionPool>;
  lastUsed: number;
}

export function createHsmProvider(deps: HsmProviderDeps, limits: HsmPoolLimits = {}): SourceProvider {
  const { stores, config, logger } = deps;
  const maxPools = Math.max(1, limits.maxPools ?? MAX_HSM_POOLS);
  const idleMs = Math.max(1, limits.idleMs ?? HSM_POOL_IDLE_MS);
  const now = limits.now ?? Date.now;
  /** Pools by account and connection id, least recently used first (Map order). */
  const pools = new Map<string, PoolEntry>();
  let sweeper: NodeJS.Timeout | undefined;
  let closed = false;

  const poolKey = (conn: HsmConnection) => `${conn.account}\u0000${conn.id}`;

  /** Forgets a pool and closes its sessions (and lets go of its library) once it is made. */
  const drop = (key: string, entry: PoolEntry, reason: string): void => {
    if (pools.get(key) === entry) pools.delete(key);
    void entry.pool.then(
      (p) => p.close(),
      () => undefined,
    );
    logger.debug({ hsm_connection: entry.connectionId, reason }, 'HSM connection pool closed');
    if (pools.size === 0 && sweeper) {
      clearInterval(sweeper);
      sweeper = undefined;
    }
  };

  const sweep = (): void => {
    const t = now();
    for (const [key, entry] of pools) if (t - entry.lastUsed >= idleMs) drop(key, entry, 'idle');
  };

  const poolFor = (conn: HsmConnection): Promise<Pkcs11SessionPool> => {
    sweep();
    const key = poolKey(conn);
    const fingerprint = JSON.stringify([conn.library, conn.token_label, conn.slot, conn.pin_sealed]);
    const existing = pools.get(key);
    if (existing?.fingerprint === fingerprint) {
      existing.lastUsed = now();
      pools.delete(key); // most recently used: last in Map order
      pools.set(key, existing);
      return existing.pool;
    }
    if (existing) drop(key, existing, 'connection changed');
    const target = { connection: conn.name, connectionId: conn.id, library: conn.library, tokenLabel: conn.token_label, slot: conn.slot };
    const pool = Pkcs11SessionPool.open(target, () => openPin(conn), logger);
    const entry: PoolEntry = { connectionId: conn.id, fingerprint, pool, lastUsed: now() };
    pools.set(key, entry);
    for (const [k, e] of pools) {
      if (pools.size <= maxPools) break;
      drop(k, e, 'too many pools');
    }
    sweeper ??= setInterval(sweep, Math.max(10, Math.min(Math.floor(idleMs / 2), 60_000))).unref();
    // A pool that could not be made (library missing, ...) is not remembered: the next job tries again.
    pool.catch(() => {
      if (pools.get(key) === entry) pools.delete(key);
    });
    return pool;
  };

  /** Runs `op` with an open pool of the connection; one evicted while this job awaited it is replaced. */
  const withPool = async <T>(conn: HsmConnection, op: (pool: Pkcs11SessionPool) => T): Promise<T> => {
    for (let tries = 1; ; tries++) {
      const pool = await poolFor(conn);
      // No await between this check and op: nothing can close the pool in between.
      if (!pool.closed || closed || tries >= 3) return op(pool);
    }
  };

  /**
   * Library and token allow-lists, checked before anything touches the library: a tenant learns nothing
   * (which tokens exist, whose PIN is what) about tokens it may not use, and narrowing either list takes effect
   * on the next job (closing the connection's pool, if it had one).
   */
  const checkAllowed = (conn: HsmConnection): void => {
    let refusal: PipelineError | undefined;
    if (!config.HSM_LIBRARIES.includes(conn.library)) {
      refusal = new PipelineError('source_library_not_allowed', `HSM connection "${conn.name}" names the PKCS#11 library ${conn.library}, which this worker does not allow (HSM_LIBRARIES).`, false);
    } else if (!hsmTokenAllowed(config.HSM_TOKENS ?? [], conn.account, conn)) {
      const token = conn.token_label !== null ? `the token labelled "${conn.token_label}"` : `the token in slot ${conn.slot}`;
      refusal = new PipelineError('source_token_not_allowed', `HSM connection "${conn.name}" names ${token}, which this account may not use (HSM_TOKENS).`, false);
    }
    if (!refusal) return;
    const key = poolKey(conn);
    const entry = pools.get(key);
    if (entry) drop(key, entry, refusal.code);
    throw refusal;
  };

  const openPin = (conn: HsmConnection): Buffer => {
    try {
      return stores.box.open(conn.pin_sealed, hsmPinContext(conn.account, conn.id));
    } catch {
      throw new PipelineError('source_auth_failed', `HSM connection "${conn.name}": its PIN cannot be unsealed with this worker's KEYFERRY_MASTER_KEY (or KEYFERRY_MASTER_KEY_PREVIOUS).`, false);
    }
  };

  return {
    async resolve(account, req): Promise<SourceKey> {
      if (closed) throw new PipelineError('source_unavailable', 'This worker is shutting down.', true);
      const ref = req.source_connection;
      const conn = ref === undefined ? undefined : await stores.hsmConnections.find(account, ref);
      if (!conn) throw new PipelineError('source_connection_not_found', `No HSM connection named or with id "${ref ?? ''}".`, false);
      // Defence in depth: the API checked both when the connection was registered; the operator may have narrowed them since.
      checkAllowed(conn);
      const identifier = req.source_key_identifier;
      let resolved: FoundKey;
      try {
        resolved = await withPool(conn, (pool) => pool.run((session) => findKey(pool.lib.module, pool.lib.ck, session, identifier, conn.name)));
      } catch (err) {
        throw classifyPkcs11(err, { connection: conn.name, doing: 'finding the key', step: 'resolve' });
      }
      return {
        id: resolved.idHex || resolved.label || identifier,
        name: resolved.label,
        origin: 'hsm-luna',
        wrappingAlgorithm: conn.wrapping_algorithm,
        wrap: async (publicKeyDer, algorithm) => {
          if (closed) throw new PipelineError('source_unavailable', 'This worker is shutting down.', true);
          checkAllowed(conn);
          try {
            // The pool is looked up again: the one resolve used may have been closed (idle, evicted) since.
            return await withPool(conn, (pool) =>
              pool.run((session) => {
                const { module, ck } = pool.lib;
                // Handles are not kept between steps: the key is found again in this session.
                const key = findKey(module, ck, session, identifier, conn.name);
                if (key.idHex !== resolved.idHex || key.label !== resolved.label) {
                  throw new PipelineError('source_key_changed', `HSM connection "${conn.name}": "${identifier}" names another key than when the job resolved it; the job will resolve it again.`, true);
                }
                return wrapInHsm(module, ck, session, key.handle, publicKeyDer, algorithm);
              }),
            );
          } catch (err) {
            throw classifyPkcs11(err, { connection: conn.name, doing: 'wrapping the key (C_WrapKey)', step: 'wrap', algorithm });
          }
        },
      };
    },

    async close() {
      closed = true;
      if (sweeper) clearInterval(sweeper);
      sweeper = undefined;
      const all = [...pools.values()];
      pools.clear();
      const settled = await Promise.allSettled(all.map((p) => p.pool));
      for (const s of settled) if (s.status === 'fulfilled') s.value.close();
    },
  };
}

type Module = Pkcs11SessionPool['lib']['module'];

/**
 * The secret key that `identifier` names: CKA_LABEL first, then, when nothing has that label and the
 * identifier is hex, CKA_ID. It must be an extractable AES key of 32 bytes. Its value is never read.
 */
function findKey(module: Module, ck: Pkcs11Binding, session: Handle, identifier: string, connection: string): FoundKey {
  let how = 'labelled';
  let handles = findObjects(module, session, [{ type: ck.CKA_LABEL, value: identifier }]);
  if (handles.length === 0 && HEX_ID.test(identifier)) {
    how = 'with CKA_ID';
    handles = findObjects(module, session, [{ type: ck.CKA_ID, value: Buffer.from(identifier, 'hex') }]);
  }
  const where = `HSM connection "${connection}"`;
  if (handles.length === 0) {
    throw new PipelineError('source_key_not_found', `${where}: no key is labelled "${identifier}"${HEX_ID.test(identifier) ? ' or has that CKA_ID' : ''} (or the connection's user cannot see it).`, false);
  }
  // Objects that are not secret keys (certificates, key pairs) may share a label with the key.
  const classes = handles.map((h) => ulong(attribute(module, session, h, ck.CKA_CLASS)));
  const secret = handles.filter((_, i) => classes[i] === ck.CKO_SECRET_KEY);
  if (secret.length > 1) {
    const count = secret.length >= FIND_LIMIT ? `${FIND_LIMIT} or more` : String(secret.length);
    throw new PipelineError('source_key_ambiguous', `${where}: ${count} secret keys are ${how} "${identifier}"; name the key by a unique label or by its CKA_ID (hex).`, false);
  }
  const [handle] = secret;
  if (!handle) {
    throw new PipelineError('source_key_wrong_type', `${where}: the object ${how} "${identifier}" is not a secret key (CKA_CLASS ${classes.map((c) => `0x${c.toString(16)}`).join(', ')}); only AES-256 keys can be uploaded.`, false);
  }
  const keyType = ulong(attribute(module, session, handle, ck.CKA_KEY_TYPE));
  const length = keyType === ck.CKK_AES ? ulong(attribute(module, session, handle, ck.CKA_VALUE_LEN)) : undefined;
  if (keyType !== ck.CKK_AES || length !== 32) {
    const what = keyType === ck.CKK_AES ? `an AES key of ${length} bytes` : `a secret key of type 0x${keyType.toString(16)} (CKA_KEY_TYPE)`;
    throw new PipelineError('source_key_wrong_type', `${where}: the key ${how} "${identifier}" is ${what}; only AES-256 keys (CKK_AES, CKA_VALUE_LEN 32) can be uploaded.`, false);
  }
  if (!bool(attribute(module, session, handle, ck.CKA_EXTRACTABLE))) {
    throw new PipelineError(
      'source_key_not_extractable',
      `${where}: the key ${how} "${identifier}" has CKA_EXTRACTABLE false, so the HSM will not wrap it and it cannot be uploaded. PKCS#11 does not let CKA_EXTRACTABLE change from false to true; upload a key created extractable.`,
      false,
    );
  }
  if (optionalBool(module, session, handle, ck.CKA_WRAP_WITH_TRUSTED)) {
    throw new PipelineError(
      'source_key_not_extractable',
      `${where}: the key ${how} "${identifier}" has CKA_WRAP_WITH_TRUSTED true: the HSM wraps it only under a trusted key, and AWS's wrapping key is imported as an untrusted session object.`,
      false,
    );
  }
  return {
    handle,
    idHex: attribute(module, session, handle, ck.CKA_ID).toString('hex'),
    label: attribute(module, session, handle, ck.CKA_LABEL).toString('utf8'),
  };
}

/**
 * RSA-OAEP wraps the key inside the HSM under AWS's wrapping public key (DER SubjectPublicKeyInfo): the key
 * is imported as a session object (CKA_TOKEN false, CKA_WRAP true) and destroyed afterwards.
 */
function wrapInHsm(module: Module, ck: Pkcs11Binding, session: Handle, key: Handle, publicKeyDer: Buffer, algorithm: WrappingAlgorithm): Buffer {
  let jwk: { kty?: string; n?: string; e?: string };
  try {
    const publicKey = createPublicKey({ key: publicKeyDer, format: 'der', type: 'spki' });
    jwk = publicKey.export({ format: 'jwk' });
  } catch (err) {
    throw new PipelineError('aws_bad_response', `The wrapping public key from GetParametersForImport is not a DER SubjectPublicKeyInfo: ${(err as Error).message}`, true);
  }
  if (jwk.kty !== 'RSA' || !jwk.n || !jwk.e) throw new PipelineError('aws_bad_response', 'The wrapping public key from GetParametersForImport is not an RSA key.', true);
  const modulus = Buffer.from(jwk.n, 'base64url');
  const publicKey = module.C_CreateObject(session, [
    { type: ck.CKA_CLASS, value: ck.CKO_PUBLIC_KEY },
    { type: ck.CKA_KEY_TYPE, value: ck.CKK_RSA },
    { type: ck.CKA_TOKEN, value: false },
    { type: ck.CKA_PRIVATE, value: false },
    { type: ck.CKA_LABEL, value: 'keyferry AWS KMS wrapping key' },
    { type: ck.CKA_WRAP, value: true },
    { type: ck.CKA_ENCRYPT, value: false },
    { type: ck.CKA_VERIFY, value: false },
    { type: ck.CKA_MODULUS, value: modulus },
    { type: ck.CKA_PUBLIC_EXPONENT, value: Buffer.from(jwk.e, 'base64url') },
  ]);
  try {
    const sha1 = algorithm === 'RSAES_OAEP_SHA_1';
    const oaep: RsaOAEP = {
      type: ck.CK_PARAMS_RSA_OAEP,
      hashAlg: sha1 ? ck.CKM_SHA_1 : ck.CKM_SHA256,
      mgf: sha1 ? ck.CKG_MGF1_SHA1 : ck.CKG_MGF1_SHA256,
      source: CKZ_DATA_SPECIFIED, // with no source data: the empty OAEP label AWS expects
    };
    const wrapped = module.C_WrapKey(session, { mechanism: ck.CKM_RSA_PKCS_OAEP, parameter: oaep }, publicKey, key, Buffer.alloc(Math.max(modulus.length, 512)));
    return Buffer.from(wrapped);
  } finally {
    try {
      module.C_DestroyObject(session, publicKey);
    } catch {
      /* a lost session took its session objects with it */
    }
  }
}

function findObjects(module: Module, session: Handle, template: { type: number; value: string | Buffer }[]): Handle[] {
  module.C_FindObjectsInit(session, template);
  try {
    return module.C_FindObjects(session, FIND_LIMIT);
  } finally {
    module.C_FindObjectsFinal(session);
  }
}

function attribute(module: Module, session: Handle, object: Handle, type: number): Buffer {
  const [a] = module.C_GetAttributeValue(session, object, [{ type }]);
  return a?.value ?? Buffer.alloc(0);
}

/** A boolean attribute the HSM may not know (CKR_ATTRIBUTE_TYPE_INVALID): false then. */
function optionalBool(module: Module, session: Handle, object: Handle, type: number): boolean {
  try {
    return bool(attribute(module, session, object, type));
  } catch (err) {
    if (ckrName(err) === 'CKR_ATTRIBUTE_TYPE_INVALID') return false;
    throw err;
  }
}

/** CK_ULONG attribute values come as native-endian buffers of 4 or 8 bytes. */
function ulong(v: Buffer): number {
  if (v.length >= 8) return Number(v.readBigUInt64LE(0));
  if (v.length >= 4) return v.readUInt32LE(0);
  return v.length > 0 ? v.readUInt8(0) : -1;
}

function bool(v: Buffer): boolean {
  return v.length > 0 && v[0] !== 0;
}
