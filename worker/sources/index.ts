import type { Config } from '../../shared/config.js';
import type { Stores } from '../../shared/context.js';
import { wrapKeyMaterial, zeroize, type WrappingAlgorithm } from '../../shared/crypto.js';
import { PipelineError } from '../../shared/errors.js';
import type { Logger } from '../../shared/logger.js';
import { localKeyContext } from '../../shared/resources.js';
import type { SourceKeyTier, UploadKeyRequest } from '../../shared/schemas/upload-key.js';
import { createDsmProvider } from './dsm.js';
import { createHsmProvider } from './hsm.js';

/** The key to upload, found in its source; the result's local_key_id/local_key_name/key_material_origin. */
export interface SourceKey {
  id: string;
  name: string;
  /** Where the material came from: `cckm` (local store), `hsm-luna` (PKCS#11 HSM) or `dsm` (KMIP server). */
  origin: string;
  /** The wrapping algorithm to ask AWS for: the OAEP hash this source can wrap with. */
  wrappingAlgorithm: WrappingAlgorithm;
  /**
   * Wraps the material under AWS's wrapping public key (DER SubjectPublicKeyInfo) with RSA-OAEP. Clear
   * material that passes through this process is zeroized before this returns; an HSM wraps it inside.
   */
  wrap(publicKeyDer: Buffer, algorithm: WrappingAlgorithm): Promise<Buffer>;
}

/** One source tier: finds a request's key; holds the tier's sessions or connections until closed. */
export interface SourceProvider {
  resolve(account: string, req: UploadKeyRequest): Promise<SourceKey>;
  close(): Promise<void>;
}

export interface SourceDeps {
  stores: Stores;
  config: Pick<Config, 'HSM_LIBRARIES' | 'DSM_ALLOW_CIDRS' | 'KMIP_TIMEOUT_MS'>;
  logger: Logger;
}

/** The source tiers of one worker process. */
export class Sources {
  readonly #providers: Record<SourceKeyTier, SourceProvider>;

  constructor(deps: SourceDeps) {
    this.#providers = { local: localProvider(deps.stores), 'hsm-luna': createHsmProvider(deps), dsm: createDsmProvider(deps) };
  }

  resolve(account: string, req: UploadKeyRequest): Promise<SourceKey> {
    return this.#providers[req.source_key_tier].resolve(account, req);
  }

  async close(): Promise<void> {
    await Promise.allSettled(Object.values(this.#providers).map((p) => p.close()));
  }
}

/** Wraps clear material in this process and zeroizes it; for sources that hand the material out. */
export async function wrapInProcess(material: Buffer, publicKeyDer: Buffer, algorithm: WrappingAlgorithm): Promise<Buffer> {
  try {
    return wrapKeyMaterial(material, publicKeyDer, algorithm);
  } finally {
    zeroize(material);
  }
}

function localProvider(stores: Stores): SourceProvider {
  return {
    async resolve(account, req) {
      const key = await stores.localKeys.find(account, req.source_key_identifier);
      if (!key) throw new PipelineError('source_key_not_found', `No local key with id or name "${req.source_key_identifier}".`, false);
      return {
        id: key.id,
        name: key.name,
        origin: 'cckm',
        wrappingAlgorithm: 'RSAES_OAEP_SHA_256',
        wrap: async (publicKeyDer, algorithm) => wrapInProcess(stores.box.open(key.material_sealed, localKeyContext(account, key.id)), publicKeyDer, algorithm),
      };
    },
    close: async () => {},
  };
}
