import type { Stores } from '../../shared/context.js';
import { PipelineError } from '../../shared/errors.js';
import { localKeyContext } from '../../shared/resources.js';
import type { UploadKeyRequest } from '../../shared/schemas/upload-key.js';

/** Where the material of an upload comes from. `readMaterial` returns a buffer the caller zeroizes. */
export interface SourceKey {
  id: string;
  name: string;
  origin: string;
  readMaterial(): Promise<Buffer>;
}

export async function resolveSource(stores: Stores, account: string, req: UploadKeyRequest): Promise<SourceKey> {
  if (req.source_key_tier !== 'local') {
    throw new PipelineError('source_tier_not_supported', `Source tier "${req.source_key_tier}" is not supported yet; use "local".`, false);
  }
  const key = await stores.localKeys.find(account, req.source_key_identifier);
  if (!key) throw new PipelineError('source_key_not_found', `No local key with id or name "${req.source_key_identifier}".`, false);
  return {
    id: key.id,
    name: key.name,
    origin: 'cckm',
    readMaterial: async () => stores.box.open(key.material_sealed, localKeyContext(account, key.id)),
  };
}
