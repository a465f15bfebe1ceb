import { z } from 'zod';

/**
 * AWS KMS request quotas, in requests per second per AWS account and region, of the operations keyferry
 * calls: AWS's documented defaults (TagResource too, which uploads send as CreateKey's Tags today).
 */
export const DEFAULT_KMS_QUOTAS = {
  CreateKey: 5,
  CreateAlias: 5,
  DeleteAlias: 15,
  DescribeKey: 2000,
  GetKeyPolicy: 1000,
  GetKeyRotationStatus: 1000,
  GetParametersForImport: 1,
  ImportKeyMaterial: 15,
  ListAliases: 500,
  ListKeys: 500,
  ListResourceTags: 2000,
  ScheduleKeyDeletion: 15,
  TagResource: 10,
} as const;

export type KmsOperation = keyof typeof DEFAULT_KMS_QUOTAS;
export type KmsQuotas = Record<KmsOperation, number>;

const OPERATIONS = Object.keys(DEFAULT_KMS_QUOTAS) as [KmsOperation, ...KmsOperation[]];

/** Some operations' quotas (requests per second); other operations keep theirs. */
export const kmsQuotaOverridesSchema = z.partialRecord(z.enum(OPERATIONS), z.number().positive().max(1_000_000), {
  error: (issue) => (issue.code === 'invalid_type' ? undefined : `Unknown KMS operation; one of ${OPERATIONS.join(', ')}.`),
});
export type KmsQuotaOverrides = z.infer<typeof kmsQuotaOverridesSchema>;

/** `Op=rate,Op=rate` (the KMS_QUOTAS variable) → the whole quota table: the defaults with these replaced. */
export const kmsQuotaListSchema = z
  .string()
  .regex(/^$|^\s*\w+\s*=\s*[\d.]+\s*(,\s*\w+\s*=\s*[\d.]+\s*)*$/, 'Op=rate pairs, comma-separated, e.g. CreateKey=10,GetParametersForImport=2')
  .transform((list) => Object.fromEntries([...list.matchAll(/(\w+)\s*=\s*([\d.]+)/g)].map(([, op, rate]) => [op, Number(rate)])))
  .pipe(kmsQuotaOverridesSchema)
  .transform((overrides): KmsQuotas => ({ ...DEFAULT_KMS_QUOTAS, ...overrides }));
