import { isIP, type BlockList } from 'node:net';
import * as tls from 'node:tls';
import { zeroize } from '../../shared/crypto.js';
import { ForbiddenAddressError, resolveAllowed, type ResolvedAddresses } from '../../shared/ssrf.js';
import {
  KmipAddressForbiddenError,
  KmipError,
  KmipNetworkError,
  KmipProtocolError,
  KmipResultError,
  KmipTlsError,
  KmipVersionMismatchError,
  type KmipNetworkFailure,
} from './errors.js';
import { parseResponse, requestMessage, type ResponseMessage } from './messages.js';
import {
  discoverVersionsPayload,
  getAttributesPayload,
  getPayload,
  locateByNamePayload,
  readDiscoverVersions,
  readGet,
  readGetAttributes,
  readLocate,
  type AttributeKey,
  type ManagedObject,
  type ObjectAttributes,
} from './operations.js';
import { nameOf, Operation, ResultStatus, Tag, type ProtocolVersion } from './tags.js';
import { decode, DEFAULT_MAX_BYTES, encode, TtlvError, type Ttlv } from './ttlv.js';

/*
 * A small KMIP client over mutual TLS: one connection at a time (requests are sent one after the other),
 * batches of one, the protocol version chosen with DiscoverVersions on each new connection. A connection
 * left without requests for `idleTimeoutMs` is closed (by an unref'd timer); the next request opens another.
 *
 * Secrets: the client's private key goes into a TLS secure context when the client is made, and the caller
 * zeroizes its copy. Every response frame is read into one buffer the client allocates (socket chunks are
 * copied in and zeroized); operations that return key material hand the frame to the caller to zeroize.
 */

/** How long a connection may stay open without a request, by default (ms). */
export const DEFAULT_IDLE_TIMEOUT_MS = 60_000;

export const SUPPORTED_VERSIONS: readonly ProtocolVersion[] = [
  { major: 2, minor: 0 },
  { major: 1, minor: 4 },
  { major: 1, minor: 3 },
  { major: 1, minor: 2 },
];

export interface KmipClientOptions {
  host: string;
  port: number;
  /** The name the server's certificate must carry (and the TLS SNI when it is not an IP); default `host`. */
  serverName?: string;
  /** PEM: the CA(s) the server's certificate must chain to. */
  ca: string;
  /** PEM: the client certificate (with the clientAuth extended key usage). */
  cert: string;
  /** PEM: the client certificate's private key. Only read while the client is made; the caller may zeroize it after. */
  key: Buffer | string;
  /** Addresses outside the SSRF guard's forbidden ranges, or inside these, may be connected to. */
  allowCidrs: BlockList;
  /** Bound on connecting (resolution, TCP, TLS handshake) and on each request's answer, ms. */
  timeoutMs: number;
  /** The highest KMIP version to offer; default 2.0. */
  maxVersion?: ProtocolVersion;
  /** Largest response accepted, bytes; also sent as Maximum Response Size. Default 1 MiB. */
  maxMessageBytes?: number;
  /** Called once per new connection with the negotiated version (for logs). */
  onConnect?: (info: { address: string; version: ProtocolVersion; tlsProtocol: string | null }) => void;
  /**
   * After this long without a request (ms; default 60 s) the connection is closed politely and `onIdle` is
   * called; the next request opens a new connection. The timer is unref'd: it never keeps a process alive.
   */
  idleTimeoutMs?: number;
  /** Called when the client went `idleTimeoutMs` without a request (its connection, if any, is closed by then). */
  onIdle?: (info: { hadConnection: boolean }) => void;
}

export interface KmipResponse {
  version: ProtocolVersion;
  /** The Response Payload, if any. Byte Strings in it are views of `frame`. */
  payload: Ttlv | undefined;
  /** The whole response as received: zeroize it when the payload held secrets. */
  frame: Buffer;
}

/** The versions to offer: the supported ones up to `max`, highest first. */
export function versionsUpTo(max: ProtocolVersion | undefined): ProtocolVersion[] {
  if (!max) return [...SUPPORTED_VERSIONS];
  return SUPPORTED_VERSIONS.filter((v) => v.major < max.major || (v.major === max.major && v.minor <= max.minor));
}

const sameVersion = (a: ProtocolVersion, b: ProtocolVersion) => a.major === b.major && a.minor === b.minor;

/** X.509 verification failures node reports by OpenSSL's verify-error name (server certificate rejected by us). */
const CERT_VERIFY_CODES = new Set([
  'UNABLE_TO_GET_ISSUER_CERT',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'UNABLE_TO_DECRYPT_CERT_SIGNATURE',
  'CERT_SIGNATURE_FAILURE',
  'CERT_NOT_YET_VALID',
  'CERT_HAS_EXPIRED',
  'CERT_REVOKED',
  'CERT_UNTRUSTED',
  'CERT_REJECTED',
  'DEPTH_ZERO_SELF_SIGNED_CERT',
  'SELF_SIGNED_CERT_IN_CHAIN',
  'CERT_CHAIN_TOO_LONG',
  'INVALID_CA',
  'INVALID_PURPOSE',
  'PATH_LENGTH_EXCEEDED',
  'HOSTNAME_MISMATCH',
  'ERR_TLS_CERT_ALTNAME_INVALID',
]);
const NETWORK_CODES: Record<string, KmipNetworkFailure> = {
  ECONNREFUSED: 'refused',
  ECONNRESET: 'reset',
  EPIPE: 'reset',
  ECONNABORTED: 'reset',
  ETIMEDOUT: 'timeout',
  EHOSTUNREACH: 'unreachable',
  ENETUNREACH: 'unreachable',
  EHOSTDOWN: 'unreachable',
  EADDRNOTAVAIL: 'unreachable',
  ENOTFOUND: 'dns',
  EAI_AGAIN: 'dns',
  EAI_FAIL: 'dns',
  ENODATA: 'dns',
};

/** Maps a socket/TLS/DNS error to the client's error types. */
export function socketError(err: unknown, where: string): KmipError {
  if (err instanceof KmipError) return err;
  const e = err as NodeJS.ErrnoException;
  const code = typeof e?.code === 'string' ? e.code : undefined;
  const message = `${where}: ${e?.message ?? String(err)}`;
  if (code && CERT_VERIFY_CODES.has(code)) return new KmipTlsError(`${where}: the server's certificate is not trusted (${code}: ${e.message})`, code, { cause: err });
  // Alerts the server sent (it refused our certificate) and other handshake failures: ERR_SSL_TLSV1_ALERT_UNKNOWN_CA, ...
  if (code && (code.startsWith('ERR_SSL_') || code.startsWith('ERR_TLS_'))) {
    const reason = (e as { reason?: unknown }).reason;
    const what = typeof reason === 'string' ? reason : e.message;
    return new KmipTlsError(
      code.includes('_ALERT_')
        ? `${where}: the server ended the TLS handshake with the alert "${what}" (${code}); does it trust the client certificate?`
        : `${where}: ${what} (${code})`,
      code,
      { cause: err },
    );
  }
  const failure = code ? NETWORK_CODES[code] : undefined;
  if (failure) return new KmipNetworkError(failure, message, code, { cause: err });
  return new KmipNetworkError('reset', message, code, { cause: err });
}

/** One TLS connection: writes a request, reads exactly one framed response. */
class Connection {
  readonly socket: tls.TLSSocket;
  version: ProtocolVersion = SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.length - 1] as ProtocolVersion;
  #closed = false;
  #chunks: Buffer[] = [];
  #buffered = 0;
  #pending: { resolve: (frame: Buffer) => void; reject: (err: Error) => void } | undefined;
  /** Whether any byte of the latest request's answer arrived (kept after the request failed). */
  #answerStarted = false;

  constructor(
    socket: tls.TLSSocket,
    private readonly maxBytes: number,
  ) {
    this.socket = socket;
    socket.on('data', (chunk: Buffer) => this.#onData(chunk));
    socket.on('error', (err) => this.#fail(socketError(err, 'KMIP connection failed')));
    socket.on('end', () => this.#fail(new KmipNetworkError('closed', 'the KMIP server closed the connection')));
    socket.on('close', () => this.#fail(new KmipNetworkError('closed', 'the KMIP connection closed')));
  }

  get closed(): boolean {
    return this.#closed || this.socket.destroyed;
  }

  /** Sends one encoded request and resolves with the response frame (header + body). */
  request(bytes: Buffer, timeoutMs: number): Promise<Buffer> {
    if (this.closed) return Promise.reject(new KmipNetworkError('closed', 'the KMIP connection is closed'));
    if (this.#pending) return Promise.reject(new Error('a KMIP request is already in flight on this connection'));
    return new Promise<Buffer>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#fail(new KmipNetworkError('timeout', `the KMIP server did not answer within ${timeoutMs} ms`));
      }, timeoutMs);
      this.#pending = {
        resolve: (frame) => {
          clearTimeout(timer);
          resolve(frame);
        },
        reject: (err) => {
          clearTimeout(timer);
          reject(err);
        },
      };
      this.#answerStarted = false;
      this.socket.write(bytes, () => zeroize(bytes));
    });
  }

  /** True once any byte of the latest request's answer arrived: the server saw it, so resending is not safe to assume. */
  get answerStarted(): boolean {
    return this.#answerStarted;
  }

  /** Ends the connection politely (TLS close_notify); a request still waiting fails as closed. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#discard();
    const pending = this.#pending;
    this.#pending = undefined;
    pending?.reject(new KmipNetworkError('closed', 'the KMIP client was closed'));
    if (!this.socket.destroyed) this.socket.end(() => this.socket.destroy());
  }

  #onData(chunk: Buffer): void {
    if (!this.#pending) {
      zeroize(chunk);
      this.#fail(new KmipProtocolError('the KMIP server sent data nobody asked for'));
      return;
    }
    this.#answerStarted = true;
    this.#chunks.push(chunk);
    this.#buffered += chunk.length;
    if (this.#buffered < 8) return;
    const header = this.#peek(8);
    const tag = header.readUIntBE(0, 3);
    const type = header.readUInt8(3);
    const length = header.readUInt32BE(4);
    if (tag !== Tag.ResponseMessage || type !== 0x01) {
      this.#fail(new KmipProtocolError(`the KMIP server answered something that is not a Response Message (starts ${header.toString('hex')})`));
      return;
    }
    if (length > this.maxBytes - 8) {
      this.#fail(new KmipProtocolError(`the KMIP response announces ${length + 8} bytes, more than the ${this.maxBytes} allowed`));
      return;
    }
    const total = 8 + length;
    if (this.#buffered < total) return;
    if (this.#buffered > total) {
      this.#fail(new KmipProtocolError('the KMIP server sent more bytes than its response holds'));
      return;
    }
    const frame = Buffer.alloc(total); // never from the shared pool: it may hold key material
    let at = 0;
    for (const c of this.#chunks) {
      c.copy(frame, at);
      at += c.length;
    }
    this.#discard();
    const pending = this.#pending;
    this.#pending = undefined;
    pending.resolve(frame);
  }

  /** The first n buffered bytes (n ≤ 8), without consuming them. */
  #peek(n: number): Buffer {
    const out = Buffer.alloc(n);
    let at = 0;
    for (const c of this.#chunks) {
      at += c.copy(out, at, 0, Math.min(c.length, n - at));
      if (at >= n) break;
    }
    return out;
  }

  #discard(): void {
    for (const c of this.#chunks) zeroize(c);
    this.#chunks = [];
    this.#buffered = 0;
  }

  /** Breaks the connection: a failed exchange leaves the stream out of step, so it is never reused. */
  #fail(err: KmipError): void {
    const first = !this.#closed;
    this.#closed = true;
    this.#discard();
    const pending = this.#pending;
    this.#pending = undefined;
    pending?.reject(err);
    if (first && !this.socket.destroyed) this.socket.destroy();
  }
}

export class KmipClient {
  readonly #opts: Omit<KmipClientOptions, 'key'>;
  readonly #context: tls.SecureContext;
  readonly #serverName: string;
  readonly #maxBytes: number;
  readonly #idleTimeoutMs: number;
  #conn: Connection | undefined;
  /** Requests run one at a time: each waits for the one before. */
  #queue: Promise<unknown> = Promise.resolve();
  #closed = false;
  /** Requests sent and not yet settled (waiting in the queue included). */
  #active = 0;
  #idleTimer: NodeJS.Timeout | undefined;

  constructor(opts: KmipClientOptions) {
    const { key, ...rest } = opts; // the key lives on only inside the secure context
    this.#opts = rest;
    this.#serverName = opts.serverName ?? opts.host;
    this.#maxBytes = opts.maxMessageBytes ?? DEFAULT_MAX_BYTES;
    this.#idleTimeoutMs = Math.max(1, opts.idleTimeoutMs ?? DEFAULT_IDLE_TIMEOUT_MS);
    try {
      this.#context = tls.createSecureContext({ ca: opts.ca, cert: opts.cert, key, minVersion: 'TLSv1.2' });
    } catch (err) {
      throw new KmipTlsError(`the connection's certificates cannot be used: ${(err as Error).message}`, (err as NodeJS.ErrnoException).code, { cause: err });
    }
  }

  /** The version negotiated on the current connection, if one is open. */
  get version(): ProtocolVersion | undefined {
    return this.#conn && !this.#conn.closed ? this.#conn.version : undefined;
  }

  /**
   * Sends one operation and returns its successful response; a failed Result Status throws KmipResultError.
   * `payload` builds the Request Payload for the connection's negotiated version. `idempotent` requests are
   * sent again once, on a new connection, when a kept-open connection turns out to have been closed by the
   * server before answering.
   */
  send(operation: number, payload: (version: ProtocolVersion) => Ttlv[], opts: { idempotent?: boolean } = {}): Promise<KmipResponse> {
    this.#active += 1;
    this.#disarmIdle();
    const run = this.#queue.then(() => this.#send(operation, payload, opts.idempotent ?? false));
    this.#queue = run.catch(() => undefined);
    const settled = () => {
      this.#active -= 1;
      if (this.#active === 0) this.#armIdle();
    };
    run.then(settled, settled);
    return run;
  }

  /** Whether a request is waiting or under way. */
  get busy(): boolean {
    return this.#active > 0;
  }

  #armIdle(): void {
    this.#disarmIdle();
    if (this.#closed) return;
    this.#idleTimer = setTimeout(() => this.#onIdle(), this.#idleTimeoutMs);
    this.#idleTimer.unref();
  }

  #disarmIdle(): void {
    if (this.#idleTimer) clearTimeout(this.#idleTimer);
    this.#idleTimer = undefined;
  }

  #onIdle(): void {
    this.#idleTimer = undefined;
    if (this.#closed || this.#active > 0) return;
    const conn = this.#conn;
    const hadConnection = conn !== undefined && !conn.closed;
    conn?.close();
    this.#conn = undefined;
    this.#opts.onIdle?.({ hadConnection });
  }

  async #send(operation: number, payload: (version: ProtocolVersion) => Ttlv[], idempotent: boolean): Promise<KmipResponse> {
    if (this.#closed) throw new KmipNetworkError('closed', 'the KMIP client is closed');
    const reused = this.#conn !== undefined && !this.#conn.closed;
    const conn = reused ? (this.#conn as Connection) : await this.#open();
    try {
      return await this.#exchange(conn, operation, payload(conn.version));
    } catch (err) {
      const droppedByServer = err instanceof KmipNetworkError && (err.failure === 'closed' || err.failure === 'reset') && !conn.answerStarted;
      if (reused && idempotent && droppedByServer && !this.#closed) {
        const fresh = await this.#open();
        return this.#exchange(fresh, operation, payload(fresh.version));
      }
      throw err;
    }
  }

  async #exchange(conn: Connection, operation: number, payload: Ttlv[]): Promise<KmipResponse> {
    const request = encode(requestMessage({ version: conn.version, operation, payload, maxResponseSize: this.#maxBytes }));
    const frame = await conn.request(request, this.#opts.timeoutMs);
    let response: ResponseMessage;
    try {
      response = parseResponse(decode(frame, { maxBytes: this.#maxBytes }));
    } catch (err) {
      zeroize(frame);
      conn.close();
      if (err instanceof TtlvError) throw new KmipProtocolError(`malformed KMIP response: ${err.message}`, { cause: err });
      throw err;
    }
    const item = response.items[0];
    const opName = nameOf(Operation, operation);
    if (response.items.length !== 1 || !item) {
      zeroize(frame);
      throw new KmipProtocolError(`the KMIP server answered ${response.items.length} batch items to a batch of one`);
    }
    if (item.resultStatus !== ResultStatus.Success) {
      zeroize(frame);
      throw new KmipResultError(opName, item.resultStatus, item.resultReason, item.resultMessage);
    }
    if (item.operation !== undefined && item.operation !== operation) {
      zeroize(frame);
      throw new KmipProtocolError(`the KMIP server answered ${nameOf(Operation, item.operation)} to ${opName}`);
    }
    return { version: response.version, payload: item.payload, frame };
  }

  /** Resolves the host, checks every address, connects over TLS to a checked one, negotiates the version. */
  async #open(): Promise<Connection> {
    this.#conn?.close();
    this.#conn = undefined;
    const { host, port, timeoutMs } = this.#opts;
    const deadline = Date.now() + timeoutMs;
    let addresses: ResolvedAddresses;
    try {
      addresses = await withTimeout(resolveAllowed(host, this.#opts.allowCidrs), timeoutMs, `resolving ${host}`);
    } catch (err) {
      if (err instanceof ForbiddenAddressError) throw new KmipAddressForbiddenError(host, err.address);
      throw socketError(err, `resolving ${host}`);
    }
    let lastError: KmipError | undefined;
    for (const { address } of addresses) {
      const left = deadline - Date.now();
      if (left <= 0) break;
      try {
        const socket = await this.#connectTls(address, port, left);
        const conn = new Connection(socket, this.#maxBytes);
        this.#conn = conn;
        conn.version = await this.#negotiate(conn);
        this.#opts.onConnect?.({ address, version: conn.version, tlsProtocol: socket.getProtocol() });
        return conn;
      } catch (err) {
        lastError = socketError(err, `connecting to ${host} (${address}) port ${port}`);
        this.#conn?.close();
        this.#conn = undefined;
        // Another address may answer when this one cannot be reached; a TLS or KMIP failure would repeat.
        if (!(lastError instanceof KmipNetworkError)) throw lastError;
      }
    }
    throw lastError ?? new KmipNetworkError('timeout', `connecting to ${host} port ${port} took longer than ${timeoutMs} ms`);
  }

  #connectTls(address: string, port: number, timeoutMs: number): Promise<tls.TLSSocket> {
    const name = this.#serverName;
    return new Promise((resolve, reject) => {
      const socket = tls.connect({
        host: address, // the checked address: no second lookup that DNS could answer differently
        port,
        secureContext: this.#context,
        ...(isIP(name) === 0 ? { servername: name } : {}),
        checkServerIdentity: (_host, cert) => tls.checkServerIdentity(name, cert),
        rejectUnauthorized: true,
        minVersion: 'TLSv1.2',
      });
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new KmipNetworkError('timeout', `connecting to ${address} port ${port} took longer than ${timeoutMs} ms`));
      }, timeoutMs);
      const onError = (err: Error) => {
        clearTimeout(timer);
        socket.destroy();
        reject(socketError(err, `connecting to ${address} port ${port}`));
      };
      socket.once('error', onError);
      socket.once('secureConnect', () => {
        clearTimeout(timer);
        socket.off('error', onError);
        resolve(socket);
      });
    });
  }

  /** DiscoverVersions: offers our versions (up to maxVersion), takes the server's first choice among them. */
  async #negotiate(conn: Connection): Promise<ProtocolVersion> {
    const offer = versionsUpTo(this.#opts.maxVersion);
    // Asked in the lowest version offered: a server that speaks any of them understands this one.
    conn.version = offer[offer.length - 1] as ProtocolVersion;
    const res = await this.#exchange(conn, Operation.DiscoverVersions, discoverVersionsPayload(offer));
    const answered = readDiscoverVersions(res.payload);
    const chosen = answered.find((v) => offer.some((o) => sameVersion(o, v)));
    if (!chosen) throw new KmipVersionMismatchError(offer, answered);
    return chosen;
  }

  // ---- operations -----------------------------------------------------------------------------------------

  /** The protocol versions the server supports among `offer` (DiscoverVersions), on the current connection. */
  async discoverVersions(offer: ProtocolVersion[] = versionsUpTo(this.#opts.maxVersion)): Promise<ProtocolVersion[]> {
    const res = await this.send(Operation.DiscoverVersions, () => discoverVersionsPayload(offer), { idempotent: true });
    return readDiscoverVersions(res.payload);
  }

  /** Unique Identifiers of the objects named `name` (at most `maxItems`). */
  async locateByName(name: string, maxItems?: number): Promise<string[]> {
    const res = await this.send(Operation.Locate, (v) => locateByNamePayload(v, name, maxItems), { idempotent: true });
    return readLocate(res.payload);
  }

  async getAttributes(uid: string, keys: AttributeKey[]): Promise<ObjectAttributes> {
    const res = await this.send(Operation.GetAttributes, (v) => getAttributesPayload(v, uid, keys), { idempotent: true });
    const out = readGetAttributes(res.version, res.payload);
    if (out.uid !== uid) throw new KmipProtocolError(`GetAttributes for "${uid}" answered for "${out.uid}"`);
    return out.attributes;
  }

  /**
   * Get: the object with its key value. The returned `material` is a fresh buffer the caller must zeroize; the
   * response frame it came from is zeroized here.
   */
  async get(uid: string): Promise<ManagedObject> {
    const res = await this.send(Operation.Get, () => getPayload(uid), { idempotent: true });
    try {
      const object = readGet(res.payload);
      if (object.uid !== uid) throw new KmipProtocolError(`Get for "${uid}" answered for "${object.uid}"`);
      if (object.material) {
        const copy = Buffer.alloc(object.material.length); // not pooled, so zeroizing it wipes the only copy
        object.material.copy(copy);
        object.material = copy;
      }
      return object;
    } finally {
      zeroize(res.frame);
    }
  }

  /** Closes the connection; later calls fail. */
  async close(): Promise<void> {
    this.#closed = true;
    this.#disarmIdle();
    this.#conn?.close();
    this.#conn = undefined;
    await this.#queue;
    const openedMeanwhile = this.#conn as Connection | undefined;
    openedMeanwhile?.close();
    this.#conn = undefined;
  }
}

function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new KmipNetworkError('timeout', `${what} took longer than ${ms} ms`)), ms);
  });
  return Promise.race([p, timeout]).finally(() => clearTimeout(timer));
}
