import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pkcs11js, { type AesGCM, type PKCS11 } from 'pkcs11js';

/** Debian's SoftHSM2 (softhsm2 2.6.1); override with SOFTHSM_LIBRARY. */
export const SOFTHSM_LIBRARY = process.env.SOFTHSM_LIBRARY ?? '/usr/lib/softhsm/libsofthsm2.so';

type Handle = Buffer;
const CKS_RO_USER_FUNCTIONS = 1;
const CKS_RW_USER_FUNCTIONS = 3;

const gcm = (iv: Buffer, aad: Buffer): AesGCM => ({ type: pkcs11js.CK_PARAMS_AES_GCM, iv, aad, ivBits: 96, tagBits: 128 });

export interface AesKeyOptions {
  label: string;
  /** CKA_ID; none when omitted. */
  id?: Buffer;
  /** 16 or 32 (CKA_VALUE_LEN). */
  bytes?: number;
  extractable?: boolean;
  /** CKA_ENCRYPT and CKA_DECRYPT, so the test can prove the key's material by AES-GCM inside the HSM. */
  encryptDecrypt?: boolean;
}

/**
 * A throw-away SoftHSM2 token for one test file: its own softhsm2.conf and token directory in a temp dir,
 * SOFTHSM2_CONF set for this process (vitest runs each file in its own process: pool 'forks') before the
 * library is first initialized, a token made with softhsm2-util, and a logged-in session to make keys with.
 * The library is shared with the worker under test (same process, same dlopen'd library, same login state).
 */
export class SoftHsm {
  readonly library = SOFTHSM_LIBRARY;
  readonly module: PKCS11;
  readonly slot: Handle;
  /** The slot id as a number, as an HSM connection's `slot` names it. */
  readonly slotId: number;
  #session: Handle | undefined;
  #closed = false;

  private constructor(
    readonly dir: string,
    readonly tokenLabel: string,
    readonly pin: string,
    private readonly previousConf: string | undefined,
  ) {
    this.module = new pkcs11js.PKCS11();
    this.module.load(this.library);
    try {
      this.module.C_Initialize();
    } catch (err) {
      // Initialized before SOFTHSM2_CONF pointed here: the token directory would be someone else's.
      this.module.close();
      throw new Error(`SoftHSM2 was already initialized in this process before the helper set SOFTHSM2_CONF: ${(err as Error).message}`, { cause: err });
    }
    const slot = this.module.C_GetSlotList(true).find((s) => this.module.C_GetTokenInfo(s).label.trimEnd() === tokenLabel);
    if (!slot) throw new Error(`the token "${tokenLabel}" did not show up`);
    this.slot = slot;
    this.slotId = Number(slot.readBigUInt64LE(0));
  }

  static start(opts: { tokenLabel?: string; pin?: string } = {}): SoftHsm {
    const dir = mkdtempSync(join(tmpdir(), 'keyferry-softhsm-'));
    const conf = join(dir, 'softhsm2.conf');
    writeFileSync(conf, [`directories.tokendir = ${join(dir, 'tokens')}`, 'objectstore.backend = file', 'log.level = ERROR', 'slots.removable = false', ''].join('\n'));
    mkdirSync(join(dir, 'tokens'));
    const previous = process.env.SOFTHSM2_CONF;
    process.env.SOFTHSM2_CONF = conf;
    const tokenLabel = opts.tokenLabel ?? 'keyferry-test';
    const pin = opts.pin ?? `pin-${randomBytes(8).toString('hex')}`;
    try {
      execFileSync('softhsm2-util', ['--init-token', '--free', '--label', tokenLabel, '--so-pin', `so-${randomBytes(8).toString('hex')}`, '--pin', pin], {
        env: { ...process.env, SOFTHSM2_CONF: conf },
        stdio: 'pipe',
      });
      return new SoftHsm(dir, tokenLabel, pin, previous);
    } catch (err) {
      rmSync(dir, { recursive: true, force: true });
      throw err;
    }
  }

  /** A logged-in R/W session; reopened after closeAllSessions, logged in again after anyone logged the token out. */
  get session(): Handle {
    this.#session ??= this.module.C_OpenSession(this.slot, pkcs11js.CKF_SERIAL_SESSION | pkcs11js.CKF_RW_SESSION);
    const { state } = this.module.C_GetSessionInfo(this.#session);
    if (state !== CKS_RO_USER_FUNCTIONS && state !== CKS_RW_USER_FUNCTIONS) {
      try {
        this.module.C_Login(this.#session, pkcs11js.CKU_USER, this.pin);
      } catch (err) {
        if ((err as Error).message !== 'CKR_USER_ALREADY_LOGGED_IN') throw err;
      }
    }
    return this.#session;
  }

  /** A token AES key with the given value: CKA_SENSITIVE true, so its value can never be read back. */
  importAesKey(value: Buffer, opts: AesKeyOptions): Handle {
    return this.module.C_CreateObject(this.session, [
      { type: pkcs11js.CKA_CLASS, value: pkcs11js.CKO_SECRET_KEY },
      { type: pkcs11js.CKA_KEY_TYPE, value: pkcs11js.CKK_AES },
      { type: pkcs11js.CKA_VALUE, value },
      ...this.#keyAttributes(opts),
    ]);
  }

  /** A token AES key generated inside the HSM (C_GenerateKey, CKM_AES_KEY_GEN): nobody ever knew its value. */
  generateAesKey(opts: AesKeyOptions): Handle {
    return this.module.C_GenerateKey(this.session, { mechanism: pkcs11js.CKM_AES_KEY_GEN }, [
      { type: pkcs11js.CKA_CLASS, value: pkcs11js.CKO_SECRET_KEY },
      { type: pkcs11js.CKA_KEY_TYPE, value: pkcs11js.CKK_AES },
      { type: pkcs11js.CKA_VALUE_LEN, value: opts.bytes ?? 32 },
      ...this.#keyAttributes(opts),
    ]);
  }

  #keyAttributes(opts: AesKeyOptions) {
    return [
      { type: pkcs11js.CKA_TOKEN, value: true },
      { type: pkcs11js.CKA_PRIVATE, value: true },
      { type: pkcs11js.CKA_SENSITIVE, value: true },
      { type: pkcs11js.CKA_EXTRACTABLE, value: opts.extractable ?? true },
      { type: pkcs11js.CKA_LABEL, value: opts.label },
      ...(opts.id ? [{ type: pkcs11js.CKA_ID, value: opts.id }] : []),
      { type: pkcs11js.CKA_ENCRYPT, value: opts.encryptDecrypt ?? false },
      { type: pkcs11js.CKA_DECRYPT, value: opts.encryptDecrypt ?? false },
    ];
  }

  /** Token and session objects of this process with the label (session objects of other sessions included). */
  findByLabel(label: string): Handle[] {
    const session = this.session;
    this.module.C_FindObjectsInit(session, [{ type: pkcs11js.CKA_LABEL, value: label }]);
    try {
      return this.module.C_FindObjects(session, 100);
    } finally {
      this.module.C_FindObjectsFinal(session);
    }
  }

  /**
   * The one object with this label. Handles are looked up each time: SoftHSM2 invalidates the handles of
   * private objects when the token is logged out (which the worker does when it logs in with another PIN).
   */
  keyHandle(label: string): Handle {
    const found = this.findByLabel(label);
    if (found.length !== 1 || !found[0]) throw new Error(`${found.length} objects are labelled "${label}"`);
    return found[0];
  }

  /** C_GetAttributeValue(CKA_VALUE): throws CKR_ATTRIBUTE_SENSITIVE for the keys made here. */
  readValue(label: string): Buffer {
    const [attr] = this.module.C_GetAttributeValue(this.session, this.keyHandle(label), [{ type: pkcs11js.CKA_VALUE }]);
    return attr?.value ?? Buffer.alloc(0);
  }

  /** AES-256-GCM (96-bit IV, 128-bit tag) inside the HSM; returns ciphertext | tag. */
  encryptGcm(label: string, iv: Buffer, aad: Buffer, plaintext: Buffer): Buffer {
    const key = this.keyHandle(label);
    const session = this.session;
    this.module.C_EncryptInit(session, { mechanism: pkcs11js.CKM_AES_GCM, parameter: gcm(iv, aad) }, key);
    return Buffer.from(this.module.C_Encrypt(session, plaintext, Buffer.alloc(plaintext.length + 16)));
  }

  /** AES-256-GCM decryption inside the HSM of ciphertext | tag; throws (CKR_ENCRYPTED_DATA_INVALID) when the tag does not verify. */
  decryptGcm(label: string, iv: Buffer, aad: Buffer, ciphertextAndTag: Buffer): Buffer {
    const key = this.keyHandle(label);
    const session = this.session;
    this.module.C_DecryptInit(session, { mechanism: pkcs11js.CKM_AES_GCM, parameter: gcm(iv, aad) }, key);
    return Buffer.from(this.module.C_Decrypt(session, ciphertextAndTag, Buffer.alloc(ciphertextAndTag.length)));
  }

  /**
   * The handles of the sessions open in this process (the worker's included). SoftHSM2 numbers sessions
   * upwards from 1: a probe session shows how far to look, then each handle is asked C_GetSessionInfo.
   */
  liveSessionHandles(): number[] {
    const probe = this.module.C_OpenSession(this.slot, pkcs11js.CKF_SERIAL_SESSION);
    const top = Number(probe.readBigUInt64LE(0));
    this.module.C_CloseSession(probe);
    const live: number[] = [];
    for (let h = 1; h < top; h++) {
      const handle = Buffer.alloc(8);
      handle.writeBigUInt64LE(BigInt(h));
      try {
        this.module.C_GetSessionInfo(handle);
        live.push(h);
      } catch {
        /* closed */
      }
    }
    return live;
  }

  /**
   * C_CloseAllSessions on the token's slot: what a token reset or an HSM restart does to every session of the
   * process, the worker's included (they share the library). The helper's own session is reopened lazily.
   */
  closeAllSessions(): void {
    this.module.C_CloseAllSessions(this.slot);
    this.#session = undefined;
  }

  /**
   * C_Finalize, as if the HSM client library were restarted under the worker: every session and login of the
   * process is gone and the library answers CKR_CRYPTOKI_NOT_INITIALIZED until someone initializes it again.
   */
  finalize(): void {
    this.module.C_Finalize();
    this.#session = undefined;
  }

  /** Finalizes the library (the worker under test must be closed first) and deletes the token directory. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    try {
      try {
        this.module.C_Finalize();
      } catch (err) {
        // The worker finalizes the library itself when it was the one to initialize it (after finalize()).
        if ((err as Error).message !== 'CKR_CRYPTOKI_NOT_INITIALIZED') throw err;
      }
      this.module.close();
    } finally {
      rmSync(this.dir, { recursive: true, force: true });
      if (this.previousConf === undefined) delete process.env.SOFTHSM2_CONF;
      else process.env.SOFTHSM2_CONF = this.previousConf;
    }
  }
}
