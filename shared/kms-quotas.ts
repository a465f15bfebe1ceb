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

/** A quota of `off` (KMS_QUOTAS only): the operation is not metered, no slot is taken before its requests. */
export const UNMETERED = Number.POSITIVE_INFINITY;

const rate = z.number().positive().max(1_000_000);

/** Some operations' quotas, as `value` validates them; other operations keep theirs. */
const quotaRecord = <T extends z.ZodType<number>>(value: T) =>
  z.partialRecord(z.enum(OPERATIONS), value, {
    error: (issue) => (issue.code === 'invalid_type' ? undefined : `Unknown KMS operation; one of ${OPERATIONS.join(', ')}.`),
  });

/** Some operations' quotas (requests per second); other operations keep theirs. */
export const kmsQuotaOverridesSchema = quotaRecord(rate);
export type KmsQuotaOverrides = z.infer<typeof kmsQuotaOverridesSchema>;

/** One `Op=rate` of KMS_QUOTAS (the rate may be `off`): the operation and the rate. */
const PAIR = String.raw`(\w+)\s*=\s*([\d.]+|off)`;

/**
 * `Op=rate,Op=rate` (the KMS_QUOTAS variable) → the whole quota table: the defaults with these replaced. A rate
 * of `off` leaves that operation unmetered (UNMETERED); `off` alone, every operation.
 */
export const kmsQuotaListSchema = z
  .string()
  .regex(new RegExp(`^$|^\\s*off\\s*$|^\\s*${PAIR}\\s*(,\\s*${PAIR}\\s*)*$`), 'Op=rate pairs, comma-separated, e.g. CreateKey=10,GetParametersForImport=2 (a rate of off: not metered), or off')
  .transform((list) => {
    const pairs = list.trim() === 'off' ? OPERATIONS.map((op) => [op, 'off']) : [...list.matchAll(new RegExp(PAIR, 'g'))].map(([, op, r]) => [op, r]);
    return Object.fromEntries(pairs.map(([op, r]) => [op, r === 'off' ? UNMETERED : Number(r)]));
  })
  .pipe(quotaRecord(rate.or(z.custom<number>((v) => v === UNMETERED))))
  .transform((overrides): KmsQuotas => ({ ...DEFAULT_KMS_QUOTAS, ...overrides }));
