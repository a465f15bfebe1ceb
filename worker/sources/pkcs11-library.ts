import type { PKCS11 } from 'pkcs11js';
import { PipelineError } from '../../shared/errors.js';
import { ckrName } from './pkcs11-errors.js';

/** The pkcs11js binding: the PKCS11 class and the CK* constants. */
export type Pkcs11Binding = typeof import('pkcs11js');

let binding: Promise<Pkcs11Binding> | undefined;

/**
 * Loads the native binding on first use, so a worker that never serves the hsm-luna tier never loads it
 * (and a missing native build fails HSM jobs, not the whole worker).
 */
export function loadPkcs11Binding(): Promise<Pkcs11Binding> {
  binding ??= import('pkcs11js').then(
    (m) => m.default,
    (err: unknown) => {
      binding = undefined;
      throw new PipelineError('source_unavailable', `The PKCS#11 binding (pkcs11js) could not be loaded on this worker: ${(err as Error).message}`, true);
    },
  );
  return binding;
}

/**
 * One PKCS#11 library loaded in this process: loaded and C_Initialize'd once per library path, shared by
 * every HSM connection that names it, finalized when the last one lets go. A library that something else in
 * the process had already initialized (CKR_CRYPTOKI_ALREADY_INITIALIZED) is used but never finalized here:
 * C_Finalize would end that other user's sessions too.
 */
export class Pkcs11Library {
  /**
   * Per token (slot id, hex): a keyed hash of the PIN this process logged in with. PKCS#11 login state
   * belongs to the application and the token, not to a session, so connections that share a token must
   * know whose PIN the current login vouches for.
   */
  readonly logins = new Map<string, string>();
  #users = 0;
  #initializedHere: boolean;

  private constructor(
    readonly path: string,
    readonly ck: Pkcs11Binding,
    readonly module: PKCS11,
    initializedHere: boolean,
  ) {
    this.#initializedHere = initializedHere;
  }

  static open(ck: Pkcs11Binding, path: string): Pkcs11Library {
    const module = new ck.PKCS11();
    try {
      module.load(path);
    } catch (err) {
      throw new PipelineError('source_unavailable', `The PKCS#11 library ${path} could not be loaded on this worker: ${(err as Error).message}`, true);
    }
    try {
      return new Pkcs11Library(path, ck, module, initialize(module));
    } catch (err) {
      quietly(() => module.close());
      throw new PipelineError('source_unavailable', `C_Initialize of the PKCS#11 library ${path} failed: ${ckrName(err) ?? (err as Error).message}`, true);
    }
  }

  /** After CKR_CRYPTOKI_NOT_INITIALIZED (someone finalized the library under us): initialize it again. */
  reinitialize(): void {
    this.logins.clear();
    if (initialize(this.module)) this.#initializedHere = true;
  }

  acquire(): this {
    this.#users++;
    return this;
  }

  /** Returns true when this was the last user (the library is then finalized, if initialized here, and closed). */
  release(): boolean {
    if (--this.#users > 0) return false;
    this.logins.clear();
    if (this.#initializedHere) quietly(() => this.module.C_Finalize());
    quietly(() => this.module.close());
    return true;
  }
}

/** C_Initialize; false when the library was already initialized in this process. */
function initialize(module: PKCS11): boolean {
  try {
    module.C_Initialize();
    return true;
  } catch (err) {
    if (ckrName(err) === 'CKR_CRYPTOKI_ALREADY_INITIALIZED') return false;
    throw err;
  }
}

function quietly(fn: () => void): void {
  try {
    fn();
  } catch {
    /* closing down: nothing to do about it */
  }
}

const libraries = new Map<string, Pkcs11Library>();

/** The library at `path`, loaded and initialized once per process; give it back with releasePkcs11Library. */
export async function acquirePkcs11Library(path: string): Promise<Pkcs11Library> {
  const ck = await loadPkcs11Binding();
  let lib = libraries.get(path);
  if (!lib) {
    lib = Pkcs11Library.open(ck, path);
    libraries.set(path, lib);
  }
  return lib.acquire();
}

export function releasePkcs11Library(lib: Pkcs11Library): void {
  if (lib.release() && libraries.get(lib.path) === lib) libraries.delete(lib.path);
}
