import { randomUUID } from 'node:crypto';
import type { Job } from 'bullmq';
import type { Config } from '../shared/config.js';
import type { Stores } from '../shared/context.js';
import { canonicalJson, sha256Hex } from '../shared/crypto.js';
import { UnprocessableError, ValidationError, type FieldError } from '../shared/errors.js';
import type { JobRecord, UploadJobData } from '../shared/jobs.js';
import { uploadJobOptions, type UploadQueue } from '../shared/queues.js';
import type { RedisClient } from '../shared/redis.js';
import { parseUploadKey, type UploadKeyRequest } from '../shared/schemas/upload-key.js';

const IDEMPOTENCY_TTL_SECONDS = 86_400;
const IDEMPOTENCY_KEY_RE = /^[\x21-\x7e]{1,255}$/;

export interface Submission {
  job: JobRecord;
  bullJob: Job<UploadJobData> | undefined;
  replayed: boolean;
}

/** Validates, authorises against the account's resources, records and enqueues upload jobs. */
export class Intake {
  constructor(
    private readonly config: Config,
    private readonly redis: RedisClient,
    private readonly stores: Stores,
    private readonly queue: UploadQueue,
  ) {}

  async submitUpload(account: string, body: unknown, idempotencyKey: string | undefined): Promise<Submission> {
    if (idempotencyKey !== undefined && !IDEMPOTENCY_KEY_RE.test(idempotencyKey)) {
      throw new ValidationError([{ path: 'header:Idempotency-Key', message: '1 to 255 printable ASCII characters.' }]);
    }
    const req = parseUploadKey(body);
    const kmsId = await this.checkReferences(account, req);
    const id = randomUUID();

    let idemKey: string | undefined;
    if (idempotencyKey !== undefined) {
      idemKey = this.stores.keys.idempotency(account, sha256Hex(idempotencyKey));
      const fingerprint = sha256Hex(canonicalJson(req));
      const claimed = await this.redis.set(idemKey, JSON.stringify({ fingerprint, job_id: id }), 'EX', IDEMPOTENCY_TTL_SECONDS, 'NX');
      if (claimed === null) return this.replay(account, idemKey, fingerprint);
    }

    const now = new Date().toISOString();
    const job: JobRecord = {
      id,
      type: 'upload-key',
      account,
      status: 'queued',
      step: null,
      attempts: 0,
      max_attempts: this.config.JOB_ATTEMPTS,
      created_at: now,
      updated_at: now,
      finished_at: null,
      batch_id: null,
      error: null,
      result: null,
      request: req,
      kms_id: kmsId,
      callback_url: req.callback_url ?? null,
      progress: {},
    };
    try {
      await this.stores.jobs.create(job);
      const bullJob = await this.queue.add('upload-key', { jobId: id, account }, { ...uploadJobOptions(this.config), jobId: id });
      return { job, bullJob, replayed: false };
    } catch (err) {
      // Nothing half-made stays behind: the client gets a 503 and may simply retry.
      await Promise.allSettled([this.stores.jobs.delete(id), idemKey ? this.redis.del(idemKey) : Promise.resolve(0)]);
      throw err;
    }
  }

  /** The KMS connection must exist and serve the region; a named template must exist. */
  private async checkReferences(account: string, req: UploadKeyRequest): Promise<string> {
    const errors: FieldError[] = [];
    const [conn, template] = await Promise.all([
      this.stores.kmsConnections.find(account, req.kms),
      req.policytemplate ? this.stores.templates.find(account, req.policytemplate) : Promise.resolve(null),
    ]);
    if (!conn) errors.push({ path: 'kms', message: `No KMS connection named or with id "${req.kms}".` });
    else if (!conn.regions.includes(req.region)) {
      errors.push({ path: 'region', message: `The KMS connection "${conn.name}" does not serve ${req.region} (it serves ${conn.regions.join(', ')}).` });
    }
    if (template === undefined) errors.push({ path: 'policytemplate', message: `No policy template named or with id "${req.policytemplate}".` });
    if (errors.length > 0 || !conn) throw new UnprocessableError('unknown_reference', 'The request names resources that do not exist.', errors);
    return conn.id;
  }

  private async replay(account: string, idemKey: string, fingerprint: string): Promise<Submission> {
    for (let i = 0; i < 20; i++) {
      const raw = await this.redis.get(idemKey);
      if (!raw) break;
      const prior = JSON.parse(raw) as { fingerprint: string; job_id: string };
      if (prior.fingerprint !== fingerprint) {
        throw new UnprocessableError('idempotency_key_reused', 'This Idempotency-Key was used with a different request body.');
      }
      const job = await this.stores.jobs.getOwned(account, prior.job_id);
      if (job) return { job, bullJob: undefined, replayed: true };
      await new Promise((r) => setTimeout(r, 50)); // the first request is still writing its record
    }
    throw new UnprocessableError('idempotency_key_in_flight', 'A request with this Idempotency-Key is still being accepted; retry shortly.');
  }
}
