import type { BlockList } from 'node:net';
import type { Config } from '../../shared/config.js';
import { zeroize } from '../../shared/crypto.js';
import { PipelineError } from '../../shared/errors.js';
import { dsmKeyContext, type DsmConnection } from '../../shared/source-connections.js';
import { parseCidrs } from '../../shared/ssrf.js';
import { KmipClient } from '../kmip/client.js';
import {
  KmipAddressForbiddenError,
  KmipError,
  KmipNetworkError,
  KmipProtocolError,
  KmipResultError,
  KmipTlsError,
  KmipVersionMismatchError,
} from '../kmip/errors.js';
import type { ManagedObject, ObjectAttributes } from '../kmip/operations.js';
import { CryptographicAlgorithm, KeyFormatType, nameOf, ObjectType, ResultReason, State, versionString, type ProtocolVersion } from '../kmip/tags.js';
import { wrapInProcess, type SourceDeps, type SourceKey, type SourceProvider } from './index.js';

/*
 * The `dsm` tier: AES-256 keys kept in a KMIP server (Thales DSM / CipherTrust Manager, or any KMIP 1.2-2.0
 * server), reached over mutual TLS with the client certificate of the request's `source_connection`.
 *
 * `source_key_identifier` is looked up as a Name first (Locate), then, when no object has that name, as a
 * Unique Identifier. The object must be a Symmetric Key, AES, 256 bits, Pre-Active or Active. Its material
 * is only fetched (Get) in the wrap step, right after its State is read again, wrapped under AWS's public key
 * in this process, and zeroized.
 *
 * Job error messages are for tenants: they never carry resolved addresses or socket/TLS error texts (see
 * dsmPipelineError); the worker logs those at warn.
 */

/** The key states that may be uploaded: a key that is deactivated, compromised or destroyed may not. */
const UPLOADABLE_STATES: ReadonlySet<number> = new Set([State.PreActive, State.Active]);

const NOT_FOUND_REASONS: ReadonlySet<number> = new Set([ResultReason.ItemNotFound, ResultReason.ObjectNotFound, ResultReason.ObjectDestroyed]);
const DENIED_REASONS: ReadonlySet<number> = new Set([
  ResultReason.PermissionDenied,
  ResultReason.AuthenticationNotSuccessful,
  ResultReason.NotAuthorised,
  ResultReason.Sensitive,
  ResultReason.NotExtractable,
]);
/** Server-side conditions a later attempt may not meet again. */
const TRANSIENT_REASONS: ReadonlySet<number> = new Set([ResultReason.GeneralFailure, ResultReason.ServerLimitExceeded, ResultReason.OperationCanceledByRequester]);

const parseVersion = (v: string | null): ProtocolVersion | undefined => {
  if (!v) return undefined;
  const [major, minor] = v.split('.').map(Number);
  return { major: major ?? 1, minor: minor ?? 2 };
};

/** KMIP clients (each a TLS connection and the secure context holding the client key) one worker process keeps at most. */
export const MAX_KMIP_CLIENTS = 64;
/** A KMIP client unused for this long closes its connection and is let go (ms). */
export const KMIP_IDLE_MS = 60_000;
/** DSM_ALLOWED_PORTS' default, for a config object that does not carry it. */
const DEFAULT_ALLOWED_PORTS: Config['DSM_ALLOWED_PORTS'] = [{ from: 5696, to: 5696 }];

export interface DsmClientLimits {
  /** At most this many KMIP clients (default MAX_KMIP_CLIENTS); one more closes the least recently used idle one. */
  maxClients?: number;
  /** A client without requests for this long (ms, default KMIP_IDLE_MS) closes its connection and is dropped. */
  idleTimeoutMs?: number;
}

export interface DsmProviderDeps extends Omit<SourceDeps, 'config'> {
  /** DSM_ALLOWED_PORTS absent (a narrowed config object): only its default, 5696, is allowed. */
  config: Pick<Config, 'DSM_ALLOW_CIDRS' | 'KMIP_TIMEOUT_MS'> & Partial<Pick<Config, 'DSM_ALLOWED_PORTS'>>;
}

/**
 * Maps what the KMIP client throws to the pipeline's stable codes, with messages a tenant may see (the job
 * record). They never say what the tenant's host resolved to, whether a port refused, reset or timed out, or
 * what TLS said: that would let a tenant map an internal network through job errors. The worker logs that
 * detail instead. A server that answered with KMIP (its certificate chains to the tenant's CA) is quoted:
 * its Result Reason and Result Message (cleaned and cut, see serverText).
 */
export function dsmPipelineError(err: unknown, connectionName: string, subject?: string): unknown {
  const server = `The KMIP server of DSM connection "${connectionName}"`;
  const about = subject ? ` for "${subject}"` : '';
  if (err instanceof PipelineError) return err;
  if (err instanceof KmipAddressForbiddenError) {
    return new PipelineError('source_address_forbidden', `The address of the KMIP server of DSM connection "${connectionName}" is not allowed (DSM_ALLOW_CIDRS).`, false);
  }
  if (err instanceof KmipTlsError) {
    return new PipelineError(
      'source_tls_failed',
      `TLS with the KMIP server of DSM connection "${connectionName}" failed: check ca_certificate, server_name and that the server trusts client_certificate (the worker's log has the detail).`,
      false,
    );
  }
  if (err instanceof KmipNetworkError) return new PipelineError('source_unavailable', `${server} could not be reached.`, true);
  if (err instanceof KmipResultError) {
    const reason = err.resultReason ?? -1;
    if (NOT_FOUND_REASONS.has(reason)) return new PipelineError('source_key_not_found', `${server} has no KMIP object${about}: ${err.message}`, false);
    if (DENIED_REASONS.has(reason)) return new PipelineError('source_permission_denied', `${server} refused access${about}: ${err.message}`, false);
    if (TRANSIENT_REASONS.has(reason)) return new PipelineError('source_unavailable', `${server} failed${about}: ${err.message}`, true);
    return new PipelineError('source_kmip_error', `${server} refused the request${about}: ${err.message}`, false);
  }
  if (err instanceof KmipVersionMismatchError) {
    const list = (v: readonly ProtocolVersion[]) => v.map(versionString).join(', ') || 'none';
    return new PipelineError('source_kmip_error', `${server} supports none of the KMIP versions offered (${list(err.offered)}); it answered ${list(err.answered)}.`, false);
  }
  if (err instanceof KmipProtocolError) return new PipelineError('source_kmip_error', `${server} did not answer with valid KMIP (the worker's log has the detail).`, false);
  return err;
}

/** Why the key's State forbids its upload (a server that does not report it included), or undefined. */
function stateProblem(what: string, state: number | undefined): PipelineError | undefined {
  if (state !== undefined && UPLOADABLE_STATES.has(state)) return undefined;
  const is = state === undefined ? 'has no State the server would tell' : `is ${nameOf(State, state)}`;
  return new PipelineError('source_key_wrong_state', `The KMIP key ${what} ${is}; only Pre-Active and Active keys can be uploaded.`, false);
}

/** Why the object cannot be uploaded (type, algorithm, size), or undefined when it can. */
function typeProblems(what: string, a: { objectType?: number; cryptographicAlgorithm?: number; cryptographicLength?: number }): PipelineError | undefined {
  const problems: string[] = [];
  if (a.objectType === undefined) problems.push('has no Object Type the server would tell');
  else if (a.objectType !== ObjectType.SymmetricKey) problems.push(`is a ${nameOf(ObjectType, a.objectType)}, not a SymmetricKey`);
  else {
    if (a.cryptographicAlgorithm !== undefined && a.cryptographicAlgorithm !== CryptographicAlgorithm.AES) {
      problems.push(`is a ${nameOf(CryptographicAlgorithm, a.cryptographicAlgorithm)} key, not AES`);
    }
    if (a.cryptographicLength !== undefined && a.cryptographicLength !== 256) problems.push(`has ${a.cryptographicLength} bits, not 256`);
  }
  if (problems.length === 0) return undefined;
  return new PipelineError('source_key_wrong_type', `The KMIP object ${what} ${problems.join(' and ')}: only AES-256 symmetric keys can be uploaded.`, false);
}

/** Checks what Get returned before its material is used; the material is zeroized when it cannot be. */
function checkFetched(what: string, obj: ManagedObject, attrs: ObjectAttributes): Buffer {
  const problem =
    typeProblems(what, {
      objectType: obj.objectType,
      cryptographicAlgorithm: obj.cryptographicAlgorithm ?? attrs.cryptographicAlgorithm,
      cryptographicLength: obj.cryptographicLength ?? attrs.cryptographicLength,
    }) ??
    (obj.wrapped ? new PipelineError('source_kmip_error', `The KMIP server returned ${what} wrapped, though no wrapping was asked for.`, false) : undefined) ??
    (obj.keyFormatType !== KeyFormatType.Raw && obj.keyFormatType !== KeyFormatType.TransparentSymmetricKey
      ? new PipelineError('source_key_wrong_type', `The KMIP object ${what} comes in key format ${nameOf(KeyFormatType, obj.keyFormatType)}, not Raw or TransparentSymmetricKey.`, false)
      : undefined) ??
    (obj.material?.length !== 32
      ? new PipelineError('source_key_wrong_type', `The KMIP object ${what} holds ${obj.material?.length ?? 0} bytes of key material, not 32.`, false)
      : undefined);
  if (problem) {
    zeroize(obj.material);
    throw problem;
  }
  return obj.material as Buffer;
}

/** A pooled KMIP client. `users` counts the jobs inside an exchange with it: a client in use is never evicted. */
interface ClientEntry {
  client: KmipClient;
  connectionId: string;
  users: number;
}

export function createDsmProvider(deps: DsmProviderDeps, limits: DsmClientLimits = {}): SourceProvider {
  const { stores, logger } = deps;
  let allow: BlockList;
  try {
    allow = parseCidrs(deps.config.DSM_ALLOW_CIDRS);
  } catch (err) {
    throw new Error(`DSM_ALLOW_CIDRS: ${(err as Error).message}`, { cause: err });
  }
  const allowedPorts = deps.config.DSM_ALLOWED_PORTS ?? DEFAULT_ALLOWED_PORTS;
  const maxClients = Math.max(1, limits.maxClients ?? MAX_KMIP_CLIENTS);
  const idleTimeoutMs = Math.max(1, limits.idleTimeoutMs ?? KMIP_IDLE_MS);

  /** One client (one kept-open TLS connection) per DSM connection in this worker process, least recently used first. */
  const clients = new Map<string, ClientEntry>();
  let closed = false;

  const drop = (poolKey: string, entry: ClientEntry, reason: 'idle' | 'lru'): void => {
    if (clients.get(poolKey) === entry) clients.delete(poolKey);
    void entry.client.close();
    logger.debug({ dsm_connection: entry.connectionId, reason }, 'kmip client closed');
  };

  /** Closes the least recently used idle clients while there are more than maxClients. */
  const trim = (): void => {
    for (const [poolKey, entry] of clients) {
      if (clients.size <= maxClients) return;
      if (entry.users === 0) drop(poolKey, entry, 'lru');
    }
  };

  /** Logs what a tenant's message leaves out (addresses, ports, socket and TLS errors), for operators. */
  const failed = (err: unknown, account: string, conn: DsmConnection, subject?: string): unknown => {
    const mapped = dsmPipelineError(err, conn.name, subject);
    if (err instanceof KmipError) {
      logger.warn(
        {
          account,
          dsm_connection: conn.id,
          host: conn.host,
          port: conn.port,
          code: mapped instanceof PipelineError ? mapped.code : undefined,
          kmip_error: err.name,
          ...(err instanceof KmipNetworkError || err instanceof KmipTlsError ? { errno: err.code } : {}),
          ...(err instanceof KmipAddressForbiddenError ? { address: err.address } : {}),
          detail: err.message,
        },
        'kmip request failed',
      );
    }
    return mapped;
  };

  const clientFor = (account: string, conn: DsmConnection): ClientEntry => {
    if (!allowedPorts.some((r) => conn.port >= r.from && conn.port <= r.to)) {
      logger.warn({ account, dsm_connection: conn.id, host: conn.host, port: conn.port, code: 'source_address_forbidden' }, 'kmip port not allowed (DSM_ALLOWED_PORTS)');
      throw new PipelineError('source_address_forbidden', `The port of the KMIP server of DSM connection "${conn.name}" is not allowed (DSM_ALLOWED_PORTS).`, false);
    }
    if (closed) throw new PipelineError('source_unavailable', `The KMIP server of DSM connection "${conn.name}" could not be reached: the worker is shutting down.`, true);
    const poolKey = `${account}\u0000${conn.id}\u0000${conn.updated_at}`;
    const existing = clients.get(poolKey);
    if (existing) {
      clients.delete(poolKey); // to the most recently used end
      clients.set(poolKey, existing);
      return existing;
    }
    let key: Buffer;
    try {
      key = stores.box.open(conn.client_key_sealed, dsmKeyContext(account, conn.id));
    } catch {
      throw new PipelineError('source_auth_failed', `The client key of DSM connection "${conn.name}" cannot be opened with this worker's master keys.`, false);
    }
    try {
      const client: KmipClient = new KmipClient({
        host: conn.host,
        port: conn.port,
        ...(conn.server_name ? { serverName: conn.server_name } : {}),
        ca: conn.ca_certificate,
        cert: conn.client_certificate,
        key,
        allowCidrs: allow,
        timeoutMs: deps.config.KMIP_TIMEOUT_MS,
        idleTimeoutMs,
        ...(conn.kmip_version ? { maxVersion: parseVersion(conn.kmip_version) as ProtocolVersion } : {}),
        onConnect: ({ address, version, tlsProtocol }) =>
          logger.info({ account, dsm_connection: conn.id, host: conn.host, port: conn.port, address, kmip_version: versionString(version), tls_protocol: tlsProtocol }, 'kmip connected'),
        // The client closed its connection after idleTimeoutMs without requests: let go of it (and its key) too.
        onIdle: () => {
          const entry = clients.get(poolKey);
          if (entry?.client === client && entry.users === 0) drop(poolKey, entry, 'idle');
        },
      });
      const entry: ClientEntry = { client, connectionId: conn.id, users: 0 };
      clients.set(poolKey, entry);
      return entry;
    } catch (err) {
      logger.warn({ account, dsm_connection: conn.id, code: 'source_tls_failed', detail: (err as Error).message }, 'kmip client certificates unusable');
      throw new PipelineError('source_tls_failed', `The certificates of DSM connection "${conn.name}" cannot be used for TLS (the worker's log has the detail).`, false);
    } finally {
      zeroize(key); // the TLS secure context holds its own copy
    }
  };

  /** Runs `f` with the connection's client, which stays in the pool (never evicted) until `f` settles. */
  const withClient = async <T>(account: string, conn: DsmConnection, f: (client: KmipClient) => Promise<T>): Promise<T> => {
    const entry = clientFor(account, conn);
    entry.users += 1;
    trim();
    try {
      return await f(entry.client);
    } finally {
      entry.users -= 1;
      trim();
    }
  };

  return {
    async resolve(account, req): Promise<SourceKey> {
      const ref = req.source_connection;
      const conn = ref === undefined ? undefined : await stores.dsmConnections.find(account, ref);
      if (!conn) throw new PipelineError('source_connection_not_found', `No DSM (KMIP) connection named or with id "${ref ?? ''}".`, false);
      const identifier = req.source_key_identifier;

      let uid: string;
      let attrs: ObjectAttributes;
      try {
        ({ uid, attrs } = await withClient(account, conn, async (client) => {
          // A Name first; two objects with the name make it ambiguous, none makes it a Unique Identifier.
          const named = await client.locateByName(identifier, 2);
          if (named.length > 1) {
            throw new PipelineError(
              'source_key_ambiguous',
              `The KMIP server of DSM connection "${conn.name}" holds several objects named "${identifier}"; name the key by its Unique Identifier.`,
              false,
            );
          }
          const found = named[0] ?? identifier;
          return { uid: found, attrs: await client.getAttributes(found, ['objectType', 'cryptographicAlgorithm', 'cryptographicLength', 'state', 'name']) };
        }));
      } catch (err) {
        if (err instanceof KmipResultError && NOT_FOUND_REASONS.has(err.resultReason ?? -1)) {
          throw new PipelineError('source_key_not_found', `The KMIP server of DSM connection "${conn.name}" has no object named or with Unique Identifier "${identifier}".`, false);
        }
        throw failed(err, account, conn, identifier);
      }
      const what = `"${identifier}"${uid === identifier ? '' : ` (Unique Identifier ${uid})`}`;
      const problem = typeProblems(what, attrs) ?? stateProblem(what, attrs.state);
      if (problem) throw problem;
      const name = uid === identifier ? (attrs.names[0] ?? uid) : identifier;

      return {
        id: uid,
        name,
        origin: 'dsm',
        wrappingAlgorithm: 'RSAES_OAEP_SHA_256',
        async wrap(publicKeyDer, algorithm) {
          let obj: ManagedObject;
          try {
            obj = await withClient(account, conn, async (client) => {
              // The key may have been deactivated, revoked or compromised since resolve (or an earlier attempt):
              // its State is read again, and no material is fetched unless it is still Pre-Active or Active.
              const now = await client.getAttributes(uid, ['state']);
              const stale = stateProblem(what, now.state);
              if (stale) throw stale;
              return client.get(uid);
            });
          } catch (err) {
            throw failed(err, account, conn, identifier);
          }
          return wrapInProcess(checkFetched(what, obj, attrs), publicKeyDer, algorithm);
        },
      };
    },

    async close() {
      closed = true;
      const all = [...clients.values()];
      clients.clear();
      await Promise.allSettled(all.map((e) => e.client.close()));
    },
  };
}
