import { randomUUID } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { KmsError } from './errors.js';
import type { Input } from './input.js';
import { operations } from './operations.js';
import { Store, type Caller } from './store.js';
import { ImportTokens } from './wrapping.js';

export { decryptEmulatorCiphertext } from './ciphertext.js';

export interface KmsEmulatorOptions {
  /** Default 127.0.0.1. */
  host?: string;
  /** Default 0 (ephemeral). */
  port?: number;
  /** Default '123456789012'. */
  defaultAccountId?: string;
  /** Access key id -> account id; other access keys belong to defaultAccountId. */
  accounts?: Record<string, string>;
  /** Latency added to every request, default 0. */
  latencyMs?: number;
  /** Lifetime of import tokens and wrapping public keys, default 24h. */
  importTokenTtlMs?: number;
  /** Operation name -> requests per second, per (account, region, operation); absent = unlimited. */
  quotas?: Record<string, number>;
  /** Keep every authenticated request's operation, caller and arrival time for requests() (grows without bound). */
  recordRequests?: boolean;
  /**
   * How long an idle keep-alive connection stays open, default Node's 5 s. A client much slower than usual (one
   * run under valgrind) may send on a connection just as the server closes it: give such a client longer.
   */
  keepAliveTimeoutMs?: number;
}

export interface RequestRecord {
  op: string;
  accountId: string;
  region: string;
  /** Arrival time, ms since the epoch. */
  at: number;
}

/**
 * Makes matching requests fail with `error`. `count`: fail the next N matching calls;
 * `rate`: fail each matching call with this probability (0..1); neither: fail every matching call.
 * `status` defaults to the error's AWS status (500 KMSInternalException, 503 DependencyTimeoutException, else 400).
 */
export interface FaultRule {
  op: string | '*';
  error: string;
  status?: number;
  message?: string;
  count?: number;
  rate?: number;
}

export interface EmulatedKeyView {
  keyId: string;
  arn: string;
  accountId: string;
  region: string;
  keyState: string;
  origin: string;
  description: string;
  multiRegion: boolean;
  tags: { TagKey: string; TagValue: string }[];
  policy: string;
  aliases: string[];
  material: Buffer | undefined;
  expirationModel?: string;
  validTo?: Date;
  creationDate: Date;
  deletionDate?: Date;
}

interface Bucket {
  rps: number;
  tokens: number;
  updatedAt: number;
}

const TARGET_PREFIX = 'TrentService.';
const CREDENTIAL_PATTERN = /Credential=([^/,\s]+)\/[^/]+\/([^/]+)\/kms\/aws4_request/;
const DAY_MS = 24 * 60 * 60 * 1000;

function increment(counts: Map<string, number>, op: string): void {
  counts.set(op, (counts.get(op) ?? 0) + 1);
}

function countOf(counts: Map<string, number>, op: string | undefined): number {
  if (op !== undefined) return counts.get(op) ?? 0;
  return [...counts.values()].reduce((sum, n) => sum + n, 0);
}

async function readBody(req: IncomingMessage): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of req) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks).toString('utf8');
}

function parseInput(body: string): Input {
  let parsed: unknown;
  try {
    parsed = body === '' ? {} : JSON.parse(body);
  } catch {
    throw new KmsError('SerializationException', 'The request body is not valid JSON.');
  }
  if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) {
    throw new KmsError('SerializationException', 'The request body must be a JSON object.');
  }
  return parsed as Input;
}

function respond(res: ServerResponse, status: number, payload: unknown, headers: Record<string, string> = {}): void {
  const body = JSON.stringify(payload);
  res.writeHead(status, {
    'content-type': 'application/x-amz-json-1.1',
    'content-length': Buffer.byteLength(body),
    'x-amzn-RequestId': randomUUID(),
    ...headers,
  });
  res.end(body);
}

/** An AWS KMS emulator speaking the AWS JSON 1.1 protocol (X-Amz-Target: TrentService.<Op>) over HTTP. */
export class KmsEmulator {
  private readonly server: Server;
  private readonly store = new Store();
  private readonly tokens: ImportTokens;
  private readonly accounts: Map<string, string>;
  private readonly quotas: Map<string, number>;
  private readonly buckets = new Map<string, Bucket>();
  private readonly calls = new Map<string, number>();
  private readonly throttles = new Map<string, number>();
  private readonly requestLog: RequestRecord[] = [];
  private faults: FaultRule[] = [];
  private latencyMs: number;
  private baseUrl: string | undefined;

  constructor(private readonly opts: KmsEmulatorOptions = {}) {
    this.tokens = new ImportTokens(opts.importTokenTtlMs ?? DAY_MS);
    this.accounts = new Map(Object.entries(opts.accounts ?? {}));
    this.quotas = new Map(Object.entries(opts.quotas ?? {}));
    this.latencyMs = opts.latencyMs ?? 0;
    this.server = createServer((req, res) => void this.handle(req, res));
    if (opts.keepAliveTimeoutMs !== undefined) this.server.keepAliveTimeout = opts.keepAliveTimeoutMs;
  }

  get url(): string {
    if (this.baseUrl === undefined) throw new Error('KmsEmulator is not started');
    return this.baseUrl;
  }

  start(): Promise<string> {
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(this.opts.port ?? 0, this.opts.host ?? '127.0.0.1', () => {
        this.server.off('error', reject);
        const { address, family, port } = this.server.address() as AddressInfo;
        this.baseUrl = `http://${family === 'IPv6' ? `[${address}]` : address}:${port}`;
        resolve(this.baseUrl);
      });
    });
  }

  /** Stops listening and drops every open connection, including idle keep-alive sockets. */
  close(): Promise<void> {
    if (!this.server.listening) return Promise.resolve();
    return new Promise((resolve, reject) => {
      this.server.close((err) => (err ? reject(err) : resolve()));
      this.server.closeAllConnections();
    });
  }

  injectFault(rule: FaultRule): void {
    this.faults.push({ ...rule });
  }

  clearFaults(): void {
    this.faults = [];
  }

  setLatency(ms: number): void {
    this.latencyMs = ms;
  }

  setQuota(op: string, rps: number | undefined): void {
    if (rps === undefined) this.quotas.delete(op);
    else this.quotas.set(op, rps);
  }

  /** Copies of every key in every account and region. */
  keys(): EmulatedKeyView[] {
    return this.store.allKeys().map((key) => ({
      keyId: key.keyId,
      arn: key.arn,
      accountId: key.accountId,
      region: key.region,
      keyState: key.keyState,
      origin: key.origin,
      description: key.description,
      multiRegion: key.multiRegion,
      tags: key.tags.map((tag) => ({ ...tag })),
      policy: key.policy,
      aliases: this.store.aliasesOf(key),
      material: key.material && Buffer.from(key.material),
      expirationModel: key.expirationModel,
      validTo: key.validTo && new Date(key.validTo),
      creationDate: new Date(key.creationDate),
      deletionDate: key.deletionDate && new Date(key.deletionDate),
    }));
  }

  /** Requests received, for one operation or in total. */
  callCount(op?: string): number {
    return countOf(this.calls, op);
  }

  /** The requests received so far, in arrival order, when the emulator was started with recordRequests. */
  requests(): RequestRecord[] {
    return this.requestLog.map((r) => ({ ...r }));
  }

  /** Requests rejected by a quota, for one operation or in total. */
  throttledCount(op?: string): number {
    return countOf(this.throttles, op);
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const target = req.headers['x-amz-target'];
    const op = typeof target === 'string' && target.startsWith(TARGET_PREFIX) ? target.slice(TARGET_PREFIX.length) : '';
    const at = Date.now();
    increment(this.calls, op);
    try {
      const body = await readBody(req);
      if (this.latencyMs > 0) await sleep(this.latencyMs);
      const caller = this.caller(req);
      if (this.opts.recordRequests) this.requestLog.push({ op, ...caller, at });
      this.throttle(caller, op);
      this.throwInjectedFault(op);
      const operation = operations.get(op);
      if (!operation) throw new KmsError('UnknownOperationException', `Unknown operation ${String(target)}`);
      const output = await operation({ store: this.store, tokens: this.tokens, caller }, parseInput(body));
      respond(res, 200, output);
    } catch (err) {
      const error = err instanceof KmsError ? err : new KmsError('KMSInternalException', 'Internal emulator error');
      if (error !== err) console.error('KMS emulator:', err);
      respond(res, error.status, { __type: error.type, message: error.message }, { 'x-amzn-ErrorType': error.type });
    }
  }

  /** Account from the access key id and region from the SigV4 credential scope; the signature is not verified. */
  private caller(req: IncomingMessage): Caller {
    const authorization = req.headers.authorization;
    if (!authorization) throw new KmsError('MissingAuthenticationTokenException', 'Missing Authentication Token');
    const [, accessKeyId = '', region = ''] = CREDENTIAL_PATTERN.exec(authorization) ?? [];
    if (!region) {
      throw new KmsError('IncompleteSignatureException', 'The Authorization header has no SigV4 credential scope for kms.');
    }
    return { accountId: this.accounts.get(accessKeyId) ?? this.opts.defaultAccountId ?? '123456789012', region };
  }

  /** Token bucket per (account, region, op): capacity max(1, rps), refilled continuously at rps. */
  private throttle(caller: Caller, op: string): void {
    const rps = this.quotas.get(op);
    if (rps === undefined) return;
    const id = `${caller.accountId}/${caller.region}/${op}`;
    const now = Date.now();
    const capacity = Math.max(1, rps);
    let bucket = this.buckets.get(id);
    if (!bucket || bucket.rps !== rps) {
      bucket = { rps, tokens: capacity, updatedAt: now };
      this.buckets.set(id, bucket);
    }
    bucket.tokens = Math.min(capacity, bucket.tokens + ((now - bucket.updatedAt) / 1000) * rps);
    bucket.updatedAt = now;
    if (bucket.tokens < 1) {
      increment(this.throttles, op);
      throw new KmsError('ThrottlingException', 'Rate exceeded');
    }
    bucket.tokens -= 1;
  }

  private throwInjectedFault(op: string): void {
    const rule = this.faults.find(
      (r) =>
        (r.op === '*' || r.op === op) &&
        (r.count === undefined || r.count > 0) &&
        (r.rate === undefined || Math.random() < r.rate),
    );
    if (!rule) return;
    if (rule.count !== undefined) rule.count -= 1;
    throw new KmsError(rule.error, rule.message ?? `Injected ${rule.error}`, rule.status);
  }
}
