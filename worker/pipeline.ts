import { randomUUID } from 'node:crypto';
import {
  CreateAliasCommand,
  CreateKeyCommand,
  DescribeKeyCommand,
  GetKeyPolicyCommand,
  GetKeyRotationStatusCommand,
  GetParametersForImportCommand,
  ImportKeyMaterialCommand,
  ListAliasesCommand,
  ListResourceTagsCommand,
  ScheduleKeyDeletionCommand,
  type KMSClient,
} from '@aws-sdk/client-kms';
import type { Stores } from '../shared/context.js';
import { wrapKeyMaterial, zeroize, type WrappingAlgorithm } from '../shared/crypto.js';
import { PipelineError } from '../shared/errors.js';
import type { JobRecord, Step } from '../shared/jobs.js';
import type { JobUpdate } from '../shared/stores/job-store.js';
import type { Logger } from '../shared/logger.js';
import { buildKeyPolicy } from '../shared/policy.js';
import type { KmsConnection, WrappingKeySpec } from '../shared/resources.js';
import type { KmsClients } from './kms-clients.js';
import { buildKeyResource, JOB_TAG_KEY, type DescribeOutput } from './result.js';
import { resolveSource, type SourceKey } from './sources/index.js';

export const WRAPPING_ALGORITHM: WrappingAlgorithm = 'RSAES_OAEP_SHA_256';
/** Import parameters this close to expiry are fetched again rather than used. */
const IMPORT_PARAMS_MARGIN_MS = 60_000;

export interface PipelineDeps {
  stores: Stores;
  clients: KmsClients;
  logger: Logger;
  defaultWrappingKeySpec: WrappingKeySpec;
  kmsTimeoutMs: number;
}

interface Resolved {
  conn: KmsConnection;
  kms: KMSClient;
  source: SourceKey;
  policy: string | undefined;
}

/**
 * Runs (or resumes) the upload pipeline of one job. Each side effect is checkpointed in the job record
 * right after it happens, so a retry skips what is done and never creates a second key.
 */
export class UploadPipeline {
  constructor(private readonly deps: PipelineDeps) {}

  async run(jobId: string): Promise<JobUpdate> {
    let job = await this.load(jobId);
    const { stores } = this.deps;
    const step = async (name: Step, change?: (j: JobRecord) => void) => {
      ({ job } = await stores.jobs.update(jobId, (j) => {
        j.step = name;
        change?.(j);
      }));
    };

    await step('resolve');
    const r = await this.resolve(job);

    if (!job.progress.kms_key_id) {
      await step('create_key');
      const tags = [...(job.request.aws_param.Tags ?? []), { TagKey: JOB_TAG_KEY, TagValue: job.id }];
      const out = await r.kms.send(
        new CreateKeyCommand({
          Origin: 'EXTERNAL',
          KeySpec: 'SYMMETRIC_DEFAULT',
          KeyUsage: 'ENCRYPT_DECRYPT',
          ...(r.policy !== undefined ? { Policy: r.policy } : {}),
          Description: job.request.aws_param.Description ?? '',
          Tags: tags,
          MultiRegion: job.request.aws_param.MultiRegion ?? false,
          BypassPolicyLockoutSafetyCheck: job.request.aws_param.BypassPolicyLockoutSafetyCheck ?? false,
        }),
        this.callOpts(),
      );
      const meta = out.KeyMetadata;
      if (!meta?.KeyId || !meta.Arn) throw new PipelineError('aws_bad_response', 'CreateKey returned no key id.', true);
      await step('create_key', (j) => {
        j.progress.kms_key_id = meta.KeyId;
        j.progress.kms_key_arn = meta.Arn;
      });
    }
    const keyId = job.progress.kms_key_id as string;

    const alias = job.request.aws_param.Alias;
    if (alias && !job.progress.alias_created) {
      await step('create_alias');
      await this.createAlias(r.kms, `alias/${alias}`, keyId);
      await step('create_alias', (j) => {
        j.progress.alias_created = true;
      });
    }

    if (!job.progress.imported) {
      let params = job.progress.import_params;
      if (!params || Date.parse(params.valid_to) - Date.now() < IMPORT_PARAMS_MARGIN_MS) {
        await step('get_import_params');
        const keySpec = r.conn.wrapping_key_spec ?? this.deps.defaultWrappingKeySpec;
        const out = await r.kms.send(
          new GetParametersForImportCommand({ KeyId: keyId, WrappingAlgorithm: WRAPPING_ALGORITHM, WrappingKeySpec: keySpec }),
          this.callOpts(),
        );
        if (!out.PublicKey || !out.ImportToken || !out.ParametersValidTo) {
          throw new PipelineError('aws_bad_response', 'GetParametersForImport returned no parameters.', true);
        }
        params = {
          public_key: Buffer.from(out.PublicKey).toString('base64'),
          import_token: Buffer.from(out.ImportToken).toString('base64'),
          valid_to: out.ParametersValidTo.toISOString(),
          algorithm: WRAPPING_ALGORITHM,
          key_spec: keySpec,
        };
        const fresh = params;
        await step('get_import_params', (j) => {
          j.progress.import_params = fresh;
        });
      }

      await step('wrap');
      const material = await r.source.readMaterial();
      let wrapped: Buffer;
      try {
        wrapped = wrapKeyMaterial(material, Buffer.from(params.public_key, 'base64'), params.algorithm as WrappingAlgorithm);
      } finally {
        zeroize(material);
      }

      await step('import');
      const expires = job.request.KeyExpiration;
      try {
        await r.kms.send(
          new ImportKeyMaterialCommand({
            KeyId: keyId,
            ImportToken: Buffer.from(params.import_token, 'base64'),
            EncryptedKeyMaterial: wrapped,
            ExpirationModel: expires ? 'KEY_MATERIAL_EXPIRES' : 'KEY_MATERIAL_DOES_NOT_EXPIRE',
            ...(expires && job.request.aws_param.ValidTo ? { ValidTo: new Date(job.request.aws_param.ValidTo) } : {}),
          }),
          this.callOpts(),
        );
      } finally {
        zeroize(wrapped);
      }
      await step('import', (j) => {
        j.progress.imported = true;
        delete j.progress.import_params;
      });
    }

    await step('describe');
    const described = await this.describe(r.kms, keyId);

    await step('record');
    const now = new Date().toISOString();
    const resource = buildKeyResource({ id: randomUUID(), account: job.account, conn: r.conn, region: job.request.region, source: r.source, described, now });
    await stores.uploadedKeys.put(job.account, resource);
    return stores.jobs.update(jobId, (j) => {
      j.status = 'succeeded';
      j.step = 'record';
      j.error = null;
      j.result = resource;
      j.finished_at = now;
    });
  }

  /** After a permanent failure: a key that never received material is scheduled for deletion (7 days). */
  async cleanUp(jobId: string): Promise<string | undefined> {
    const job = await this.load(jobId);
    if (!job.progress.kms_key_id || job.progress.imported || job.progress.deletion_scheduled_for) return undefined;
    const conn = await this.deps.stores.kmsConnections.find(job.account, job.kms_id);
    if (!conn) return undefined;
    const kms = this.deps.clients.get(conn, job.request.region);
    const out = await kms.send(new ScheduleKeyDeletionCommand({ KeyId: job.progress.kms_key_id, PendingWindowInDays: 7 }), this.callOpts());
    const when = (out.DeletionDate ?? new Date(Date.now() + 7 * 86_400_000)).toISOString();
    await this.deps.stores.jobs.update(jobId, (j) => {
      j.progress.deletion_scheduled_for = when;
    });
    return when;
  }

  /** Every KMS call carries its own deadline. */
  private callOpts() {
    return { abortSignal: AbortSignal.timeout(this.deps.kmsTimeoutMs) };
  }

  private async load(jobId: string): Promise<JobRecord> {
    const job = await this.deps.stores.jobs.get(jobId);
    if (!job) throw new PipelineError('job_record_missing', `The record of job ${jobId} is missing.`, false);
    return job;
  }

  private async resolve(job: JobRecord): Promise<Resolved> {
    const { stores } = this.deps;
    const conn = await stores.kmsConnections.find(job.account, job.kms_id);
    if (!conn) throw new PipelineError('kms_connection_not_found', `The KMS connection "${job.request.kms}" no longer exists.`, false);
    if (!conn.regions.includes(job.request.region)) {
      throw new PipelineError('region_not_allowed', `The KMS connection "${conn.name}" does not serve ${job.request.region}.`, false);
    }
    let templatePolicy: string | undefined;
    if (job.request.policytemplate) {
      const t = await stores.templates.find(job.account, job.request.policytemplate);
      if (!t) throw new PipelineError('policy_template_not_found', `The policy template "${job.request.policytemplate}" no longer exists.`, false);
      templatePolicy = t.policy;
    }
    const source = await resolveSource(stores, job.account, job.request);
    return { conn, kms: this.deps.clients.get(conn, job.request.region), source, policy: buildKeyPolicy(job.request, conn.account_id, templatePolicy) };
  }

  /** CreateAlias; an alias that already names this key (an earlier attempt made it) is success. */
  private async createAlias(kms: KMSClient, aliasName: string, keyId: string): Promise<void> {
    try {
      await kms.send(new CreateAliasCommand({ AliasName: aliasName, TargetKeyId: keyId }), this.callOpts());
    } catch (err) {
      if ((err as Error).name !== 'AlreadyExistsException') throw err;
      const mine = await kms.send(new ListAliasesCommand({ KeyId: keyId }), this.callOpts());
      if (!mine.Aliases?.some((a) => a.AliasName === aliasName)) {
        throw new PipelineError('alias_taken', `The alias ${aliasName} already names another key in this account and region.`, false);
      }
    }
  }

  private async describe(kms: KMSClient, keyId: string): Promise<DescribeOutput> {
    const [d, p, a, t, rot] = await Promise.all([
      kms.send(new DescribeKeyCommand({ KeyId: keyId }), this.callOpts()),
      kms.send(new GetKeyPolicyCommand({ KeyId: keyId, PolicyName: 'default' }), this.callOpts()),
      kms.send(new ListAliasesCommand({ KeyId: keyId }), this.callOpts()),
      kms.send(new ListResourceTagsCommand({ KeyId: keyId }), this.callOpts()),
      kms.send(new GetKeyRotationStatusCommand({ KeyId: keyId }), this.callOpts()),
    ]);
    if (!d.KeyMetadata) throw new PipelineError('aws_bad_response', 'DescribeKey returned no metadata.', true);
    return {
      metadata: d.KeyMetadata,
      policy: p.Policy,
      aliases: (a.Aliases ?? []).map((x) => x.AliasName ?? '').filter(Boolean),
      tags: t.Tags ?? [],
      rotationEnabled: rot.KeyRotationEnabled ?? false,
    };
  }
}
