import { createHmac, randomBytes } from 'node:crypto';
import type { Logger } from 'pino';
import { zeroize } from '../../shared/crypto.js';
import { PipelineError } from '../../shared/errors.js';
import { ckrName, isPinFailure, isSessionLost } from './pkcs11-errors.js';
import { acquirePkcs11Library, releasePkcs11Library, type Pkcs11Library } from './pkcs11-library.js';

/** A PKCS#11 handle (session, slot, object): pkcs11js passes CK_ULONGs as Buffers. */
export type Handle = Buffer;

// Session states (CK_STATE); pkcs11js does not export them.
const CKS_RO_USER_FUNCTIONS = 1;
const CKS_RW_USER_FUNCTIONS = 3;
const CKS_RO_PUBLIC_SESSION = 0;
const CKS_RW_PUBLIC_SESSION = 2;

/** After the HSM refused a PIN, this worker does not present it again for this long (failed logins lock users). */
export const PIN_REFUSED_HOLD_MS = 10 * 60_000;
const MAX_IDLE_SESSIONS = 4;

/** Keys the PIN fingerprints below; per process, never stored. */
const PIN_FINGERPRINT_KEY = randomBytes(32);

export interface Pkcs11Target {
  /** Connection name, for messages and logs. */
  connection: string;
  connectionId: string;
  library: string;
  tokenLabel: string | null;
  slot: number | null;
}

/** Opens the connection's sealed PIN into a fresh buffer; the pool zeroizes it right after C_Login. */
export type PinOpener = () => Buffer;

/**
 * The sessions of one HSM connection in this worker process, opened lazily and reused. pkcs11js calls are
 * synchronous, so an operation (`run`) runs start to end without other JavaScript in between: one session
 * per connection is what a worker ends up using, whatever its concurrency.
 *
 * The PIN is not kept: the pool keeps the sealed PIN (as stored in Redis) and opens it only for C_Login,
 * zeroizing the buffer after. pkcs11js takes the PIN as a JavaScript string, which cannot be wiped; it is
 * garbage once C_Login returns.
 */
export class Pkcs11SessionPool {
  readonly #lib: Pkcs11Library;
  readonly #target: Pkcs11Target;
  readonly #openPin: PinOpener;
  readonly #pinFingerprint: string;
  readonly #logger: Logger;
  #slot: Handle | undefined;
  #idle: Handle[] = [];
  #pinRefused: { ckr: string; until: number } | undefined;
  #closed = false;

  private constructor(lib: Pkcs11Library, target: Pkcs11Target, openPin: PinOpener, logger: Logger) {
    this.#lib = lib;
    this.#target = target;
    this.#openPin = openPin;
    this.#logger = logger.child({ hsm_connection: target.connectionId, library: target.library });
    const pin = openPin();
    try {
      this.#pinFingerprint = createHmac('sha256', PIN_FINGERPRINT_KEY).update(pin).digest('hex');
    } finally {
      zeroize(pin);
    }
  }

  static async open(target: Pkcs11Target, openPin: PinOpener, logger: Logger): Promise<Pkcs11SessionPool> {
    const lib = await acquirePkcs11Library(target.library);
    try {
      return new Pkcs11SessionPool(lib, target, openPin, logger);
    } catch (err) {
      releasePkcs11Library(lib);
      throw err;
    }
  }

  get lib(): Pkcs11Library {
    return this.#lib;
  }

  /** Closed (shutdown, or evicted by the provider): `run` refuses; get a new pool instead. */
  get closed(): boolean {
    return this.#closed;
  }

  /**
   * Runs one operation in a logged-in session of the connection's token. When the session turns out to be
   * gone (token reset, HSM restart, C_CloseAllSessions, logged out under us), the pool drops its sessions,
   * reopens, logs in again and runs the operation once more.
   */
  run<T>(op: (session: Handle) => T): T {
    for (let attempt = 1; ; attempt++) {
      if (this.#closed) throw new PipelineError('source_unavailable', `HSM connection "${this.#target.connection}": this worker is shutting down.`, true);
      let session: Handle | undefined;
      let loggedIn = false;
      try {
        session = this.#idle.pop() ?? this.#openSession();
        this.#login(session);
        loggedIn = true;
        const out = op(session);
        this.#giveBack(session);
        return out;
      } catch (err) {
        const lost = isSessionLost(err);
        if (session) {
          // A session that could not be logged in with this connection's PIN (refused, held back, or any other
          // failure) is not kept: only sessions that are ours and logged in go back to the idle list.
          if (lost || !loggedIn) this.#closeQuietly(session);
          else this.#giveBack(session);
        }
        if (!lost || attempt >= 2) throw err;
        this.#logger.warn({ ckr: ckrName(err) }, 'HSM session lost; reopening and retrying once');
        this.#reset(ckrName(err));
      }
    }
  }

  /** Closes this pool's sessions (never other users' sessions) and lets go of the library. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const s of this.#idle.splice(0)) this.#closeQuietly(s);
    if (this.#slot) this.#lib.logins.delete(this.#slot.toString('hex'));
    releasePkcs11Library(this.#lib);
  }

  #giveBack(session: Handle): void {
    if (this.#idle.length < MAX_IDLE_SESSIONS) this.#idle.push(session);
    else this.#closeQuietly(session);
  }

  #openSession(): Handle {
    const { module, ck } = this.#lib;
    this.#slot ??= this.#findSlot();
    // Read-only: session objects (the imported wrapping public key) may be created in R/O sessions.
    const session = module.C_OpenSession(this.#slot, ck.CKF_SERIAL_SESSION);
    this.#logger.debug('HSM session opened');
    return session;
  }

  #findSlot(): Handle {
    const { module } = this.#lib;
    const { tokenLabel, slot, connection, library } = this.#target;
    const slots = module.C_GetSlotList(true);
    if (tokenLabel !== null) {
      const matches = slots.filter((s) => {
        try {
          return module.C_GetTokenInfo(s).label.trimEnd() === tokenLabel;
        } catch {
          return false; // the token left between C_GetSlotList and C_GetTokenInfo
        }
      });
      if (matches.length > 1) {
        throw new PipelineError('source_token_ambiguous', `HSM connection "${connection}": ${matches.length} tokens of ${library} are labelled "${tokenLabel}"; register the connection with a slot instead.`, false);
      }
      const [found] = matches;
      if (!found) throw new PipelineError('source_unavailable', `HSM connection "${connection}": no token labelled "${tokenLabel}" is present in ${library}.`, true);
      return found;
    }
    const found = slots.find((s) => handleNumber(s) === slot);
    if (!found) throw new PipelineError('source_unavailable', `HSM connection "${connection}": no token is present in slot ${slot} of ${library}.`, true);
    return found;
  }

  /**
   * Makes sure the token is logged in with this connection's PIN. Login state is per application and token:
   * a login made with another connection's PIN (or by anyone this pool cannot vouch for) proves nothing about
   * ours, so it is logged out and ours presented; otherwise a wrong PIN would ride on someone else's login.
   */
  #login(session: Handle): void {
    const { module, ck, logins } = this.#lib;
    const { connection } = this.#target;
    const slotKey = (this.#slot as Handle).toString('hex');
    const state = module.C_GetSessionInfo(session).state;
    const loggedIn = state === CKS_RO_USER_FUNCTIONS || state === CKS_RW_USER_FUNCTIONS;
    if (loggedIn && logins.get(slotKey) === this.#pinFingerprint) return;

    if (this.#pinRefused && Date.now() < this.#pinRefused.until) {
      throw new PipelineError(
        'source_auth_failed',
        `HSM connection "${connection}": the HSM refused this connection's PIN (${this.#pinRefused.ckr}); this worker does not present it again before ${new Date(this.#pinRefused.until).toISOString()}, so as not to lock the user. Register the connection again with the right PIN.`,
        false,
      );
    }
    if (state !== CKS_RO_PUBLIC_SESSION && state !== CKS_RW_PUBLIC_SESSION) this.#logout(session);
    logins.delete(slotKey);

    for (let tries = 1; ; tries++) {
      const pin = this.#openPin();
      try {
        module.C_Login(session, ck.CKU_USER, pin.toString('utf8'));
        break;
      } catch (err) {
        if (isPinFailure(err)) {
          const ckr = ckrName(err) as string;
          this.#pinRefused = { ckr, until: Date.now() + PIN_REFUSED_HOLD_MS };
          this.#logger.warn({ ckr }, 'the HSM refused the PIN of this connection');
          throw new PipelineError('source_auth_failed', `HSM connection "${connection}": the HSM refused the connection's PIN (${ckr}).`, false);
        }
        // Logged in after all (another library user, or a session state that lagged): log out, present ours.
        if (ckrName(err) === 'CKR_USER_ALREADY_LOGGED_IN' && tries === 1) {
          this.#logout(session);
          continue;
        }
        throw err;
      } finally {
        zeroize(pin);
      }
    }
    this.#pinRefused = undefined;
    logins.set(slotKey, this.#pinFingerprint);
    this.#logger.debug('logged in to the HSM token');
  }

  #logout(session: Handle): void {
    try {
      this.#lib.module.C_Logout(session);
    } catch (err) {
      if (ckrName(err) !== 'CKR_USER_NOT_LOGGED_IN') throw err;
    }
  }

  /** Forgets every session and the login; after CKR_CRYPTOKI_NOT_INITIALIZED initializes the library again. */
  #reset(ckr: string | undefined): void {
    for (const s of this.#idle.splice(0)) this.#closeQuietly(s);
    if (this.#slot) this.#lib.logins.delete(this.#slot.toString('hex'));
    // A token found by label may come back in another slot.
    if (this.#target.tokenLabel !== null) this.#slot = undefined;
    if (ckr === 'CKR_CRYPTOKI_NOT_INITIALIZED') this.#lib.reinitialize();
  }

  #closeQuietly(session: Handle): void {
    try {
      this.#lib.module.C_CloseSession(session);
    } catch {
      /* already gone */
    }
  }
}

/** A CK_ULONG handle as a number (slot ids are compared with the connection's `slot`). */
export function handleNumber(h: Buffer): number {
  if (h.length >= 8) return Number(h.readBigUInt64LE(0));
  if (h.length >= 4) return h.readUInt32LE(0);
  return h.length > 0 ? h.readUInt8(0) : 0;
}
