import type { BlockList } from 'node:net';
import { zeroize } from '../../shared/crypto.js';
import { PipelineError } from '../../shared/errors.js';
import { dsmKeyContext, type DsmConnection } from '../../shared/source-connections.js';
import { parseCidrs } from '../../shared/ssrf.js';
import { KmipClient } from '../kmip/client.js';
import { KmipAddressForbiddenError, KmipNetworkError, KmipProtocolError, KmipResultError, KmipTlsError } from '../kmip/errors.js';
import type { ManagedObject, ObjectAttributes } from '../kmip/operations.js';
import { CryptographicAlgorithm, KeyFormatType, nameOf, ObjectType, ResultReason, State, versionString, type ProtocolVersion } from '../kmip/tags.js';
import { wrapInProcess, type SourceDeps, type SourceKey, type SourceProvider } from './index.js';

/*
 * The `dsm` tier: AES-256 keys kept in a KMIP server (Thales DSM / CipherTrust Manager, or any KMIP 1.2-2.0
 * server), reached over mutual TLS with the client certificate of the request's `source_connection`.
 *
 * `source_key_identifier` is looked up as a Name first (Locate), then, when no object has that name, as a
 * Unique Identifier. The object must be a Symmetric Key, AES, 256 bits, Pre-Active or Active. Its material
 * is only fetched (Get) in the wrap step, wrapped under AWS's public key in this process, and zeroized.
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

/** Maps what the KMIP client throws to the pipeline's stable codes. */
export function dsmPipelineError(err: unknown, where: string, subject?: string): unknown {
  const about = subject ? ` for "${subject}"` : '';
  if (err instanceof PipelineError) return err;
  if (err instanceof KmipAddressForbiddenError) return new PipelineError('source_address_forbidden', `${where}: ${err.message}.`, false);
  if (err instanceof KmipTlsError) return new PipelineError('source_tls_failed', `${where}: TLS failed: ${err.message}`, false);
  if (err instanceof KmipNetworkError) return new PipelineError('source_unavailable', `${where} is unavailable: ${err.message}`, true);
  if (err instanceof KmipResultError) {
    const reason = err.resultReason ?? -1;
    if (NOT_FOUND_REASONS.has(reason)) return new PipelineError('source_key_not_found', `${where} has no KMIP object${about}: ${err.message}`, false);
    if (DENIED_REASONS.has(reason)) return new PipelineError('source_permission_denied', `${where} refused access${about}: ${err.message}`, false);
    if (TRANSIENT_REASONS.has(reason)) return new PipelineError('source_unavailable', `${where} failed${about}: ${err.message}`, true);
    return new PipelineError('source_kmip_error', `${where} refused the request${about}: ${err.message}`, false);
  }
  if (err instanceof KmipProtocolError) return new PipelineError('source_kmip_error', `${where}: ${err.message}`, false);
  return err;
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

export function createDsmProvider(deps: SourceDeps): SourceProvider {
  const { stores, logger } = deps;
  let allow: BlockList;
  try {
    allow = parseCidrs(deps.config.DSM_ALLOW_CIDRS);
  } catch (err) {
    throw new Error(`DSM_ALLOW_CIDRS: ${(err as Error).message}`, { cause: err });
  }
  /** One client (one kept-open TLS connection) per DSM connection in this worker process. */
  const clients = new Map<string, KmipClient>();

  const clientFor = (account: string, conn: DsmConnection): KmipClient => {
    const poolKey = `${account}\u0000${conn.id}\u0000${conn.updated_at}`;
    const existing = clients.get(poolKey);
    if (existing) return existing;
    let key: Buffer;
    try {
      key = stores.box.open(conn.client_key_sealed, dsmKeyContext(account, conn.id));
    } catch {
      throw new PipelineError('source_auth_failed', `The client key of DSM connection "${conn.name}" cannot be opened with this worker's master keys.`, false);
    }
    try {
      const client = new KmipClient({
        host: conn.host,
        port: conn.port,
        ...(conn.server_name ? { serverName: conn.server_name } : {}),
        ca: conn.ca_certificate,
        cert: conn.client_certificate,
        key,
        allowCidrs: allow,
        timeoutMs: deps.config.KMIP_TIMEOUT_MS,
        ...(conn.kmip_version ? { maxVersion: parseVersion(conn.kmip_version) as ProtocolVersion } : {}),
        onConnect: ({ address, version, tlsProtocol }) =>
          logger.info({ account, dsm_connection: conn.id, host: conn.host, port: conn.port, address, kmip_version: versionString(version), tls_protocol: tlsProtocol }, 'kmip connected'),
      });
      clients.set(poolKey, client);
      return client;
    } finally {
      zeroize(key); // the TLS secure context holds its own copy
    }
  };

  return {
    async resolve(account, req): Promise<SourceKey> {
      const ref = req.source_connection;
      const conn = ref === undefined ? undefined : await stores.dsmConnections.find(account, ref);
      if (!conn) throw new PipelineError('source_connection_not_found', `No DSM (KMIP) connection named or with id "${ref ?? ''}".`, false);
      const where = `The KMIP server of DSM connection "${conn.name}" (${conn.host}:${conn.port})`;
      const identifier = req.source_key_identifier;
      let client: KmipClient;
      try {
        client = clientFor(account, conn);
      } catch (err) {
        throw dsmPipelineError(err, where);
      }

      let uid: string;
      let attrs: ObjectAttributes;
      try {
        // A Name first; two objects with the name make it ambiguous, none makes it a Unique Identifier.
        const named = await client.locateByName(identifier, 2);
        if (named.length > 1) {
          throw new PipelineError('source_key_ambiguous', `${where} holds several objects named "${identifier}"; name the key by its Unique Identifier.`, false);
        }
        uid = named[0] ?? identifier;
        attrs = await client.getAttributes(uid, ['objectType', 'cryptographicAlgorithm', 'cryptographicLength', 'state', 'name']);
      } catch (err) {
        if (err instanceof KmipResultError && NOT_FOUND_REASONS.has(err.resultReason ?? -1)) {
          throw new PipelineError('source_key_not_found', `${where} has no object named or with Unique Identifier "${identifier}".`, false);
        }
        throw dsmPipelineError(err, where, identifier);
      }
      const what = `"${identifier}"${uid === identifier ? '' : ` (Unique Identifier ${uid})`}`;
      const wrongType = typeProblems(what, attrs);
      if (wrongType) throw wrongType;
      if (attrs.state !== undefined && !UPLOADABLE_STATES.has(attrs.state)) {
        throw new PipelineError('source_key_wrong_state', `The KMIP key ${what} is ${nameOf(State, attrs.state)}; only Pre-Active and Active keys can be uploaded.`, false);
      }
      const name = uid === identifier ? (attrs.names[0] ?? uid) : identifier;

      return {
        id: uid,
        name,
        origin: 'dsm',
        wrappingAlgorithm: 'RSAES_OAEP_SHA_256',
        async wrap(publicKeyDer, algorithm) {
          let obj: ManagedObject;
          try {
            obj = await client.get(uid);
          } catch (err) {
            throw dsmPipelineError(err, where, identifier);
          }
          return wrapInProcess(checkFetched(what, obj, attrs), publicKeyDer, algorithm);
        },
      };
    },

    async close() {
      const all = [...clients.values()];
      clients.clear();
      await Promise.allSettled(all.map((c) => c.close()));
    },
  };
}
