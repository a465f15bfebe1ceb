import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as tls from 'node:tls';
import { KmipClient } from '../../worker/kmip/client.js';
import { attribute1x, nameValue } from '../../worker/kmip/operations.js';
import {
  CryptographicAlgorithm,
  CryptographicUsageMask,
  KeyFormatType,
  ObjectType,
  Operation,
  RevocationReasonCode,
  SecretDataType,
  Tag,
  type ProtocolVersion,
} from '../../worker/kmip/tags.js';
import { byteString, enumeration, integer, required, structure, textString, type Ttlv } from '../../worker/kmip/ttlv.js';
import { parseCidrs } from '../../shared/ssrf.js';

/*
 * A real PyKMIP server (Debian's python3-pykmip 0.10.0) for the `dsm` tier's tests: its own temp dir with a
 * test PKI, config, SQLite database and log; mutual TLS 1.2; objects owned by the client certificate's CN.
 * One per test file (it takes about half a second to start).
 */

const PYTHON = '/usr/bin/python3';
const PYKMIP_SERVER = '/usr/bin/pykmip-server';

export interface CertAndKey {
  cert: string;
  key: string;
}

export interface Pki {
  dir: string;
  /** The CA the server trusts, and that signed the server's certificate. */
  ca: CertAndKey;
  /** A CA nobody trusts. */
  rogueCa: CertAndKey;
  server: CertAndKey;
  /** Issues a certificate (EC P-256) signed by `signer` (default: the CA), by default a client certificate (clientAuth). */
  issue(cn: string, opts?: { signer?: CertAndKey; eku?: 'clientAuth' | 'serverAuth' | 'none'; altNames?: string }): CertAndKey;
}

function openssl(args: string[], cwd: string): void {
  const r = spawnSync('openssl', args, { cwd, encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`openssl ${args.join(' ')} failed: ${r.stderr}`);
}

/** A CA, a rogue CA and a server certificate for 127.0.0.1/localhost, made with Debian's openssl CLI. */
export function makePki(dir: string): Pki {
  const files = (name: string) => ({ certPath: join(dir, `${name}.crt`), keyPath: join(dir, `${name}.key`) });
  const read = (name: string): CertAndKey => ({ cert: readFileSync(files(name).certPath, 'utf8'), key: readFileSync(files(name).keyPath, 'utf8') });
  const newCa = (name: string, cn: string) => {
    const f = files(name);
    openssl(
      ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', f.keyPath, '-out', f.certPath, '-days', '2', '-subj', `/CN=${cn}`,
        '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign'],
      dir,
    );
    return read(name);
  };
  const ca = newCa('ca', 'keyferry test CA');
  const rogueCa = newCa('rogue-ca', 'keyferry rogue CA');
  const caFiles = new Map<string, { certPath: string; keyPath: string }>([[ca.cert, files('ca')], [rogueCa.cert, files('rogue-ca')]]);
  let n = 0;
  const issue: Pki['issue'] = (cn, opts = {}) => {
    const signer = caFiles.get((opts.signer ?? ca).cert);
    if (!signer) throw new Error('unknown signer');
    const name = `leaf-${++n}`;
    const f = files(name);
    const csr = join(dir, `${name}.csr`);
    const ext = join(dir, `${name}.ext`);
    openssl(['req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', f.keyPath, '-out', csr, '-subj', `/CN=${cn}`], dir);
    writeFileSync(
      ext,
      [
        'basicConstraints=critical,CA:FALSE',
        'keyUsage=critical,digitalSignature,keyAgreement',
        ...(opts.eku === 'none' ? [] : [`extendedKeyUsage=${opts.eku ?? 'clientAuth'}`]),
        'subjectKeyIdentifier=hash',
        'authorityKeyIdentifier=keyid',
        ...(opts.altNames ? [`subjectAltName=${opts.altNames}`] : []),
      ].join('\n'),
    );
    openssl(['x509', '-req', '-in', csr, '-CA', signer.certPath, '-CAkey', signer.keyPath, '-set_serial', `0x${randomBytes(8).toString('hex')}`, '-days', '2', '-out', f.certPath, '-extfile', ext], dir);
    return read(name);
  };
  const server = issue('localhost', { eku: 'serverAuth', altNames: 'IP:127.0.0.1,DNS:localhost' });
  writeFileSync(join(dir, 'server.crt'), server.cert);
  writeFileSync(join(dir, 'server.key'), server.key);
  return { dir, ca, rogueCa, server, issue };
}

async function freePort(): Promise<number> {
  const srv = createServer();
  await new Promise<void>((resolve) => srv.listen(0, '127.0.0.1', resolve));
  const { port } = srv.address() as AddressInfo;
  await new Promise<void>((resolve) => srv.close(() => resolve()));
  return port;
}

export interface PyKmip {
  host: '127.0.0.1';
  port: number;
  pki: Pki;
  /** The client certificate whose CN owns the objects the tests make. */
  client: CertAndKey & { cn: string };
  /** A test-side client on the owner's certificate (KMIP 1.2), for making and changing objects. */
  admin: KmipClient;
  running: boolean;
  /** Kills the server (SIGKILL to its process group) and waits for it to exit. Its database stays. */
  stop(): Promise<void>;
  /** Starts it again on the same port with the same database. */
  start(): Promise<void>;
  /** Freezes the server (SIGSTOP to its process group): connections stay open, nothing is answered. */
  pause(): void;
  /** Lets a paused server go on (SIGCONT). */
  resume(): void;
  /** The server's own log file. */
  log(): string;
  /** Stops the server and removes its directory. */
  close(): Promise<void>;
}

/** Starts pykmip-server on a free loopback port in a fresh temp dir and waits until it accepts mutual TLS. */
export async function startPyKmip(opts: { clientCn?: string } = {}): Promise<PyKmip> {
  const dir = mkdtempSync(join(tmpdir(), 'keyferry-pykmip-'));
  let proc: ChildProcess | undefined;
  let exited: Promise<void> = Promise.resolve();
  const output: string[] = [];
  const signalGroup = (signal: NodeJS.Signals) => {
    if (proc?.pid === undefined) throw new Error('pykmip-server is not running');
    process.kill(-proc.pid, signal);
  };
  const killGroup = () => {
    if (proc?.pid !== undefined && proc.exitCode === null && proc.signalCode === null) {
      try {
        process.kill(-proc.pid, 'SIGKILL'); // the server, its multiprocessing manager and policy monitor
      } catch {
        /* already gone */
      }
    }
  };
  // A test run that dies without afterAll must not leave a server behind.
  process.once('exit', killGroup);

  try {
    const pki = makePki(dir);
    const cn = opts.clientCn ?? 'keyferry-worker';
    const client = { ...pki.issue(cn), cn };
    const port = await freePort();
    const conf = join(dir, 'server.conf');
    writeFileSync(
      conf,
      [
        '[server]',
        'hostname=127.0.0.1',
        `port=${port}`,
        `certificate_path=${join(dir, 'server.crt')}`,
        `key_path=${join(dir, 'server.key')}`,
        `ca_path=${join(dir, 'ca.crt')}`,
        'auth_suite=TLS1.2',
        'enable_tls_client_auth=True',
        'logging_level=DEBUG',
        `database_path=${join(dir, 'pykmip.sqlite')}`,
        `policy_path=${dir}`,
        '',
      ].join('\n'),
    );
    const logPath = join(dir, 'server.log');

    const waitUntilServing = async () => {
      const deadline = Date.now() + 15_000;
      for (;;) {
        if (proc?.exitCode !== null || proc.signalCode !== null) throw new Error(`pykmip-server exited:\n${output.join('')}`);
        const ok = await new Promise<boolean>((resolve) => {
          const s = tls.connect({ host: '127.0.0.1', port, ca: pki.ca.cert, cert: client.cert, key: client.key, servername: 'localhost', minVersion: 'TLSv1.2' });
          s.once('secureConnect', () => {
            s.end();
            resolve(true);
          });
          s.once('error', () => {
            s.destroy();
            resolve(false);
          });
        });
        if (ok) return;
        if (Date.now() > deadline) throw new Error(`pykmip-server did not accept TLS within 15 s:\n${output.join('')}`);
        await new Promise((r) => setTimeout(r, 50));
      }
    };

    const admin = new KmipClient({
      host: '127.0.0.1',
      port,
      ca: pki.ca.cert,
      cert: client.cert,
      key: client.key,
      allowCidrs: parseCidrs('127.0.0.1/32'),
      timeoutMs: 5_000,
      maxVersion: { major: 1, minor: 2 },
    });
    const server: PyKmip = {
      host: '127.0.0.1',
      port,
      pki,
      client,
      admin,
      running: false,
      async start() {
        proc = spawn(PYTHON, [PYKMIP_SERVER, '-f', conf, '-l', logPath], { cwd: dir, detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
        proc.stdout?.on('data', (c: Buffer) => output.push(c.toString('utf8')));
        proc.stderr?.on('data', (c: Buffer) => output.push(c.toString('utf8')));
        const p = proc;
        exited = new Promise<void>((resolve) => p.once('exit', () => resolve()));
        await waitUntilServing();
        server.running = true;
      },
      pause: () => signalGroup('SIGSTOP'),
      resume: () => signalGroup('SIGCONT'),
      async stop() {
        killGroup();
        await exited;
        server.running = false;
      },
      log: () => {
        try {
          return readFileSync(logPath, 'utf8');
        } catch {
          return '';
        }
      },
      async close() {
        await admin.close();
        await server.stop();
        process.off('exit', killGroup);
        rmSync(dir, { recursive: true, force: true });
      },
    };
    await server.start();
    return server;
  } catch (err) {
    killGroup();
    await exited;
    process.off('exit', killGroup);
    rmSync(dir, { recursive: true, force: true });
    throw err;
  }
}

// ---- test-only KMIP operations (KMIP 1.x encodings: the admin client speaks 1.2) ---------------------------

const V12: ProtocolVersion = { major: 1, minor: 2 };
const uidOf = (payload: Ttlv | undefined) => required(payload as Ttlv, Tag.UniqueIdentifier, 'TextString').value;

function templateAttribute(attrs: Ttlv[]): Ttlv {
  return structure(Tag.TemplateAttribute, attrs);
}

/** Registers a symmetric key with known material (Raw format) under `name`; returns its Unique Identifier. */
export async function registerSymmetricKey(client: KmipClient, o: { name?: string; material: Buffer; algorithm?: number }): Promise<string> {
  const bits = o.material.length * 8;
  const algorithm = o.algorithm ?? CryptographicAlgorithm.AES;
  const res = await client.send(Operation.Register, (v) => {
    if (v.major !== V12.major || v.minor !== V12.minor) throw new Error('the test helpers speak KMIP 1.2');
    return [
      enumeration(Tag.ObjectType, ObjectType.SymmetricKey),
      templateAttribute([
        attribute1x('Cryptographic Algorithm', enumeration(Tag.CryptographicAlgorithm, algorithm)),
        attribute1x('Cryptographic Length', integer(Tag.CryptographicLength, bits)),
        attribute1x('Cryptographic Usage Mask', integer(Tag.CryptographicUsageMask, CryptographicUsageMask.Encrypt | CryptographicUsageMask.Decrypt)),
        ...(o.name ? [attribute1x('Name', nameValue(o.name, Tag.AttributeValue))] : []),
      ]),
      structure(Tag.SymmetricKey, [
        structure(Tag.KeyBlock, [
          enumeration(Tag.KeyFormatType, KeyFormatType.Raw),
          structure(Tag.KeyValue, [byteString(Tag.KeyMaterial, o.material)]),
          enumeration(Tag.CryptographicAlgorithm, algorithm),
          integer(Tag.CryptographicLength, bits),
        ]),
      ]),
    ];
  });
  return uidOf(res.payload);
}

/** Registers a Secret Data object (a password) under `name`. */
export async function registerSecretData(client: KmipClient, name: string, secret: Buffer): Promise<string> {
  const res = await client.send(Operation.Register, () => [
    enumeration(Tag.ObjectType, ObjectType.SecretData),
    templateAttribute([
      attribute1x('Cryptographic Usage Mask', integer(Tag.CryptographicUsageMask, CryptographicUsageMask.Export)),
      attribute1x('Name', nameValue(name, Tag.AttributeValue)),
    ]),
    structure(Tag.SecretData, [
      enumeration(Tag.SecretDataType, SecretDataType.Password),
      structure(Tag.KeyBlock, [enumeration(Tag.KeyFormatType, KeyFormatType.Opaque), structure(Tag.KeyValue, [byteString(Tag.KeyMaterial, secret)])]),
    ]),
  ]);
  return uidOf(res.payload);
}

/** Has the server generate an AES key of `bits` under `name` (Create). */
export async function createAesKey(client: KmipClient, name: string, bits: number): Promise<string> {
  const res = await client.send(Operation.Create, () => [
    enumeration(Tag.ObjectType, ObjectType.SymmetricKey),
    templateAttribute([
      attribute1x('Cryptographic Algorithm', enumeration(Tag.CryptographicAlgorithm, CryptographicAlgorithm.AES)),
      attribute1x('Cryptographic Length', integer(Tag.CryptographicLength, bits)),
      attribute1x('Cryptographic Usage Mask', integer(Tag.CryptographicUsageMask, CryptographicUsageMask.Encrypt | CryptographicUsageMask.Decrypt)),
      attribute1x('Name', nameValue(name, Tag.AttributeValue)),
    ]),
  ]);
  return uidOf(res.payload);
}

/** Revokes with reason Key Compromise: the key's state becomes Compromised. */
export async function revokeCompromised(client: KmipClient, uid: string): Promise<void> {
  await client.send(Operation.Revoke, () => [
    textString(Tag.UniqueIdentifier, uid),
    structure(Tag.RevocationReason, [enumeration(Tag.RevocationReasonCode, RevocationReasonCode.KeyCompromise)]),
  ]);
}

/** Activates a Pre-Active object: its state becomes Active. */
export async function activate(client: KmipClient, uid: string): Promise<void> {
  await client.send(Operation.Activate, () => [textString(Tag.UniqueIdentifier, uid)]);
}

/** Revokes an Active key for a reason other than compromise: its state becomes Deactivated. */
export async function revokeDeactivated(client: KmipClient, uid: string): Promise<void> {
  await client.send(Operation.Revoke, () => [
    textString(Tag.UniqueIdentifier, uid),
    structure(Tag.RevocationReason, [enumeration(Tag.RevocationReasonCode, RevocationReasonCode.Unspecified)]),
  ]);
}
