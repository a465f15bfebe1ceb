import { PipelineError } from '../../shared/errors.js';
import type { SourceDeps, SourceProvider } from './index.js';

/** The `hsm-luna` tier (PKCS#11). Not built yet. */
export function createHsmProvider(_deps: SourceDeps): SourceProvider {
  return {
    resolve: () => Promise.reject(new PipelineError('source_tier_not_supported', 'Source tier "hsm-luna" is not supported yet.', false)),
    close: async () => {},
  };
}
