import { PipelineError } from '../../shared/errors.js';
import type { SourceDeps, SourceProvider } from './index.js';

/** The `dsm` tier (KMIP). Not built yet. */
export function createDsmProvider(_deps: SourceDeps): SourceProvider {
  return {
    resolve: () => Promise.reject(new PipelineError('source_tier_not_supported', 'Source tier "dsm" is not supported yet.', false)),
    close: async () => {},
  };
}
