import { randomUUID } from 'node:crypto';
import {
  CreateAliasCommand,
  CreateKeyCommand,
  DeleteAliasCommand,
  DescribeKeyCommand,
  GetKeyPolicyCommand,
  GetKeyRotationStatusCommand,
  GetParametersForImportCommand,
  ImportKeyMaterialCommand,
  ListAliasesCommand,
  ListKeysCommand,
  ListResourceTagsCommand,
  ScheduleKeyDeletionCommand,
  type KeyMetadata,
} from '@aws-sdk/client-kms';
import type { Stores } from '../shared/context.js';
import { zeroize, type WrappingAlgorithm } from '../shared/crypto.js';
import { PipelineError } from '../shared/errors.js';
import { mayHaveMadeKey, type JobProgress, type JobRecord, type Step } from '../shared/jobs.js';
import type { KmsOperation } from '../shared/kms-quotas.js';
import type { HeldJob, JobUpdate } from '../shared/stores/job-store.js';
import type { Logger } from '../shared/logger.js';
import { stepDuration } from '../shared/metrics.js';
import { buildKeyPolicy } from '../shared/policy.js';
import type { KmsConnection, PolicyTemplate, WrappingKeySpec } from '../shared/resources.js';
import { faultPoint } from './fault-point.js';
import { classify } from './classify.js';
import type { KmsClients } from './kms-clients.js';
import { neverSent, type KmsQuota, type MeteredKms } from './kms-quota.js';
import { buildKeyResource, JOB_TAG_KEY, type DescribeOutput } from './result.js';
import type { SourceKey, Sources } from './sources/index.js';

/** Import parameters this close to expiry are fetched again rather than used. */
const IMPORT_PARAMS_MARGIN_MS = 60_000;

/** The requests of the describe step, sent at once. */
const DESCRIBE_OPERATIONS = ['DescribeKey', 'GetKeyPolicy', 'ListAliases', 'ListResourceTags', 'GetKeyRotationStatus'] as const;

export interface PipelineDeps {
  stores: Stores;
  sources: Sources;
  clients: KmsClients;
  quota: KmsQuota;
  logger: Logger;
  defaultWrappingKeySpec: WrappingKeySpec;
}

/**
 * The request did nothing: it was never sent (it waits for its quota, or its slot could not be taken), or KMS
 * answered with a client error (4xx). Timeouts, network errors and 5xx leave that in doubt.
 */
function didNothing(err: unknown): boolean {
  if (neverSent(err)) return true;
  const status = (err as { $metadata?: { httpStatusCode?: number } } | undefined)?.$metadata?.httpStatusCode;
  return status !== undefined && status >= 400 && status < 500;
}

/**
 * A record write and a KMS request sent together: both settle before anything is thrown, so that no failure
 * record can overtake the write. A failed write is thrown first, even when the request failed too: the write
 * may be a checkpoint, and a request's permanent failure judged without it would leave the clean-up working
 * from a record that misses it (an alias left naming a key scheduled for deletion). Redis errors are
 * retryable, so the attempt is retried and ends on the request's own failure with the checkpoint recorded.
 */
export async function together<T>(write: Promise<void> | undefined, request: Promise<T>): Promise<T> {
  const [written, answered] = await Promise.allSettled([write, request]);
  if (written.status === 'rejected') throw written.reason;
  if (answered.status === 'rejected') throw answered.reason;
  return answered.value;
}

type ImportParams = NonNullable<JobProgress['import_params']>;

interface KeyRef {
  KeyId: string;
  Arn: string;
}

/** The resolve step's reads of Redis, started together (UploadPipeline.lookUp). */
export interface Lookups {
  conn: Promise<KmsConnection | undefined>;
  template: Promise<PolicyTemplate | undefined> | undefined;
  localSource: Promise<SourceKey> | undefined;
}

interface Resolved {
  conn: KmsConnection;
  kms: MeteredKms;
  source: SourceKey;
  policy: string | undefined;
}

/** Times the steps of one attempt into keyferry_step_duration_seconds: a step lasts until the next one starts. */
class StepTimer {
  #current: { step: Step; end: () => number } | undefined;
  #failedIn: Step | undefined;

  /** The step a failure of this attempt happened in: the current one, unless failedIn said otherwise. */
  get failedStep(): Step | undefined {
    return this.#failedIn ?? this.#current?.step;
  }

  /** A failure about to be thrown happened in `step`, not in the step the attempt is in. */
  failedIn(step: Step): void {
    this.#failedIn = step;
  }

  enter(step: Step): void {
    if (this.#current?.step === step) return;
    this.end();
    this.#current = { step, end: stepDuration.startTimer({ step }) };
  }

  end(): void {
    this.#current?.end();
    this.#current = undefined;
  }
}

/** The create_key intent: CreateKey may be sent from now on (with no kms_key_id, a retry looks for its key by tag). */
function recordCreateKeyIntent(j: JobRecord): void {
  j.progress.create_key_started_at = new Date().toISOString();
}

/** Takes the intent back: no CreateKey went out, so no retry or clean-up need look for a key. */
function dropCreateKeyIntent(j: JobRecord): void {
  delete j.progress.create_key_started_at;
}

/** The alias the request asks for, as KMS names it (`alias/<Alias>`); undefined for none. */
function aliasNameOf(request: JobRecord['request']): string | undefined {
  return request.aws_param.Alias ? `alias/${request.aws_param.Alias}` : undefined;
}

/** Import parameters still usable: present and not within IMPORT_PARAMS_MARGIN_MS of expiry. */
function usableImportParams(params: JobRecord['progress']['import_params']): params is NonNullable<JobRecord['progress']['import_params']> {
  return params !== undefined && Date.parse(params.valid_to) - Date.now() >= IMPORT_PARAMS_MARGIN_MS;
}

/**
 * The step a record shows while the pipeline is in `step`. A local-store key is wrapped in this process, in
 * well under a millisecond, right before ImportKeyMaterial: its record shows `import` already, so that no
 * write enters `import` after the wrap (a failure in the wrap is still recorded at `wrap`: AttemptFailure).
 */
function shownStep(request: JobRecord['request'], step: Step): Step {
  return step === 'wrap' && request.source_key_tier === 'local' ? 'import' : step;
}

/**
 * The step the pipeline goes to next from a job's progress (after resolve), as its record shows it. A
 * checkpoint records it along with the progress, so that entering that step needs no write of its own.
 */
function upcomingStep(request: JobRecord['request'], p: JobProgress): Step {
  if (!p.kms_key_id) return 'create_key';
  if (request.aws_param.Alias && !p.alias_created) return 'create_alias';
  if (!p.imported) return usableImportParams(p.import_params) ? shownStep(request, 'wrap') : 'get_import_params';
  return 'describe';
}

/** What a run of the pipeline has done so far, as far as its failure handling needs to know. */
export interface RunState {
  /** The record as this run last wrote it (the start write's, to begin with). */
  held: HeldJob;
  /** The id of the key this run's own CreateKey made (not one it adopted). */
  madeKeyId?: string;
}

/**
 * What UploadPipeline.run throws: the failure (`cause`) and the step it happened in, for the failure record,
 * whose step may be another (a local-store job's shows `import` while wrapping, see shownStep), and the run's
 * state: the record as this run last wrote it, which the failure record is written from (JobStore.updateFrom),
 * and the key it made, if any.
 */
export class AttemptFailure extends Error {
  constructor(
    override readonly cause: unknown,
    readonly step: Step | undefined,
    readonly run: RunState,
  ) {
    super(`upload attempt failed${step ? ` at ${step}` : ''}`, { cause });
    this.name = 'AttemptFailure';
  }
}

/**
 * The KMS requests each step starts with (on its ordinary path). Their quota slots are asked for while the
 * write that enters the step is on its way, so that the two take one round trip's time, not two; the request
 * itself still goes only after both answered.
 */
const STEP_OPERATIONS: Partial<Record<Step, readonly KmsOperation[]>> = {
  create_key: ['CreateKey'],
  create_alias: ['CreateAlias'],
  get_import_params: ['GetParametersForImport'],
  import: ['ImportKeyMaterial'],
  describe: DESCRIBE_OPERATIONS,
};

/** The KMS requests a step starts with: with an alias to create, GetParametersForImport goes with CreateAlias. */
function stepOperations(step: Step, p: JobProgress): readonly KmsOperation[] | undefined {
  if (step === 'create_alias' && !p.imported && !usableImportParams(p.import_params)) return ['CreateAlias', 'GetParametersForImport'];
  return STEP_OPERATIONS[step];
}

/**
 * Runs (or resumes) the upload pipeline of one job. Each side effect is checkpointed in the job record
 * right after it happens, so a retry skips what is done and never creates a second key.
 */
export class UploadPipeline {
  constructor(private readonly deps: PipelineDeps) {}

  /**
   * The worker's start write (status `running`, this attempt), applied to the record it read; it enters
   * `resolve`. A job that has asked KMS for nothing yet, and whose resolve step only reads Redis (a local-tier
   * source: lookUp sends those reads with this write), also records its create_key intent here and enters
   * `create_key`: CreateKey then needs no write of its own before it. Should resolve fail, run() takes the
   * intent back before anything else (no retry or clean-up then looks for a key by tag).
   */
  static start(j: JobRecord, attempt: number): void {
    j.status = 'running';
    j.attempts = attempt;
    j.step = 'resolve';
    if (j.request.source_key_tier === 'local' && !mayHaveMadeKey(j.progress)) {
      recordCreateKeyIntent(j);
      j.step = 'create_key';
    }
  }

  /**
   * `started`: the job's record as the worker's start write (UploadPipeline.start) left it;
   * `lookups`: lookUp of the record the start write went from (the job's request does not change).
   */
  async run(started: HeldJob, lookups: Lookups = this.lookUp(started.job)): Promise<JobUpdate> {
    const timer = new StepTimer();
    const last: RunState = { held: started };
    try {
      return await this.#run(last, lookups, timer);
    } catch (err) {
      throw new AttemptFailure(err, timer.failedStep, last);
    } finally {
      timer.end();
    }
  }

  async #run(last: RunState, lookups: Lookups, timer: StepTimer): Promise<JobUpdate> {
    const { stores } = this.deps;
    // Every write goes from the record as this run last wrote it, in one round trip, and only if nothing else
    // wrote it since (JobStore.updateFrom throws JobTakenOver then: another worker took the job over).
    let job = last.held.job;
    const write = async (change: (j: JobRecord) => void) => {
      last.held = await stores.jobs.updateFrom(last.held, change);
      job = last.held.job;
    };
    // The worker's start write entered resolve, or create_key with the intent recorded ahead of resolve.
    const intentAhead = job.step === 'create_key' && !job.progress.kms_key_id && job.progress.create_key_started_at !== undefined;
    timer.enter('resolve');
    const r = await this.resolve(job, lookups).catch(async (err: unknown) => {
      // No CreateKey went out: the failure is recorded at resolve, with no intent to look for a key by. Should
      // that write fail too (Redis away), the resolve failure still decides: the intent left behind only costs
      // a look for the key by tag.
      if (intentAhead) {
        await write((j) => {
          dropCreateKeyIntent(j);
          j.step = 'resolve';
        }).catch((e: unknown) => this.deps.logger.warn({ job_id: job.id, err: (e as Error).message }, 'could not take back the create_key intent'));
      }
      throw err;
    });
    /** The last step with KMS requests whose quota slots were asked for ahead (once per step). */
    let slotsAskedFor: Step | undefined;
    const askSlots = (name: Step, progress: JobProgress = job.progress) => {
      const ops = stepOperations(name, progress);
      if (!ops || slotsAskedFor === name) return;
      r.kms.takeSlots(ops);
      slotsAskedFor = name;
    };
    /**
     * A checkpoint on its way while the request after it goes: only before requests that are safe to repeat
     * (sendAfter, and the wrap and import). Every other step or checkpoint waits for it first.
     */
    let recording: Promise<void> | undefined;
    /** Takes the checkpoint on its way, if any (undefined when there is none: awaiting it then waits for nothing). */
    const takeRecording = () => {
      const pending = recording;
      recording = undefined;
      return pending;
    };
    /**
     * Enters a step; the record says so at once, unless a checkpoint already wrote it as the upcoming step.
     * The step's quota slots are asked for before anything is awaited: its request may go out meanwhile.
     */
    const step = async (name: Step, change?: (j: JobRecord) => void) => {
      timer.enter(name);
      askSlots(name);
      await takeRecording();
      const shown = shownStep(job.request, name);
      if (job.step === shown && !change) return;
      await write((j) => {
        j.step = shown;
        change?.(j);
      });
    };
    /**
     * Records a side effect (right after it happened) and, with it, the step that comes next, whose slots it
     * asks for, unless `beforeFailure` (a failure is thrown next: nothing will be sent).
     */
    const checkpoint = async (change: (p: JobProgress) => void, beforeFailure = false) => {
      await takeRecording();
      const progress = { ...job.progress };
      change(progress);
      const next = upcomingStep(job.request, progress);
      if (!beforeFailure) askSlots(next, progress);
      await write((j) => {
        change(j.progress);
        j.step = next;
      });
    };
    /**
     * Sends a checkpoint on its way (see `recording`). Its failure is thrown by whoever takes it (takeRecording);
     * until then it counts as handled, so that local work awaited meanwhile (an HSM's or a KMIP server's wrap)
     * cannot leave it rejected with no handler, which would end the process.
     */
    const sendCheckpoint = (change: (p: JobProgress) => void) => {
      const write = checkpoint(change);
      write.catch(() => undefined);
      recording = write;
    };
    /**
     * Enters a step whose work is safe to repeat, with the checkpoint on its way, if any, which already recorded
     * this step as the upcoming one; without one, as `step` does. Returns that checkpoint (in an object, so that
     * it is not awaited here) for the caller to settle together with the step's work.
     */
    const enterAlong = async (name: Step): Promise<{ pending: Promise<void> | undefined }> => {
      const pending = takeRecording();
      if (pending) {
        timer.enter(name);
        askSlots(name);
      } else {
        await step(name);
      }
      return { pending };
    };
    /**
     * Enters a step whose request is safe to repeat (a crash before the checkpoint before it lands only means
     * it is done again): that checkpoint, which already recorded this step as the upcoming one, goes out
     * together with the request instead of before it.
     */
    const sendAfter = async <T>(name: Step, request: () => Promise<T>): Promise<T> => {
      const { pending } = await enterAlong(name);
      return together(pending, Promise.resolve().then(request));
    };

    let keyId = job.progress.kms_key_id;
    if (!keyId) {
      // An intent without a key id: an earlier attempt may have died between CreateKey and its checkpoint.
      let key = job.progress.create_key_started_at && !intentAhead ? await this.findCreatedKey(r.kms, job.id) : undefined;
      if (key) {
        this.deps.logger.info({ job_id: job.id, kms_key_id: key.KeyId }, 'resuming with the key an earlier attempt created');
        timer.enter('create_key');
      } else {
        await step('create_key', intentAhead ? undefined : recordCreateKeyIntent);
        faultPoint('before:create_key');
        key = await this.createKey(r, job).catch(async (err: unknown) => {
          // The request made no key: a retry need not look for one.
          if (didNothing(err)) await step('create_key', dropCreateKeyIntent);
          throw err;
        });
        last.madeKeyId = key.KeyId;
        faultPoint('after:create_key');
      }
      const { KeyId, Arn } = key;
      // The requests after it (CreateAlias, GetParametersForImport) are safe to repeat: this checkpoint goes
      // with them. A crash before it lands leaves the intent without a key id, as a crash right after
      // CreateKey does: the retry finds the key by its tag.
      sendCheckpoint((p) => {
        p.kms_key_id = KeyId;
        p.kms_key_arn = Arn;
      });
      keyId = KeyId;
    }

    const aliasName = aliasNameOf(job.request);
    const needsAlias = aliasName !== undefined && !job.progress.alias_created;
    let params = job.progress.imported || !usableImportParams(job.progress.import_params) ? undefined : job.progress.import_params;
    const needsParams = !job.progress.imported && !params;
    if (needsAlias || needsParams) {
      // CreateAlias and GetParametersForImport need only the key, and both are safe to repeat (an alias that
      // already names this key counts as done): they go out together, and one checkpoint records both.
      const [aliased, fetched] = await sendAfter(needsAlias ? 'create_alias' : 'get_import_params', () =>
        Promise.allSettled([
          needsAlias ? this.createAlias(r.kms, aliasName, keyId) : undefined,
          needsParams ? this.importParams(r, keyId) : undefined,
        ]),
      );
      const aliasMade = needsAlias && aliased.status === 'fulfilled';
      const fresh = fetched.status === 'fulfilled' ? fetched.value : undefined;
      const record = (p: JobProgress) => {
        if (aliasMade) p.alias_created = true;
        if (fresh) p.import_params = fresh;
      };
      const failed = aliased.status === 'rejected' ? aliased : fetched.status === 'rejected' ? fetched : undefined;
      if (failed) {
        // What did succeed is recorded before the failure is thrown: a clean-up must know of the alias, and
        // a retry reuses the parameters.
        if (aliasMade || fresh) await checkpoint(record, true);
        if (failed === fetched) timer.failedIn('get_import_params');
        throw failed.reason;
      }
      params = fresh ?? params;
      // Neither the wrap nor the import needs anything from this checkpoint: both go while it is on its way
      // (see below). A failed wrap or import is thrown only once it settled, so that the retry reuses the
      // parameters; a crash before it lands makes the retry ask for new ones (and make the alias again, which
      // then names this key already), as a crash right after GetParametersForImport does.
      sendCheckpoint(record);
    }

    if (!job.progress.imported) {
      if (!params) {
        // Fetched above: unreachable. The checkpoint on its way settles first all the same.
        await takeRecording();
        throw new Error('no import parameters to wrap with');
      }
      const { public_key, algorithm, import_token } = params;
      // The wrap and the import are safe to repeat (KMS takes the same material again, with new parameters):
      // the checkpoint on its way, if any, goes along with both, not before them.
      const { pending } = await enterAlong('wrap');
      // Held for the zeroing below also when a write's failure is thrown instead of the import's.
      let wrapped: Buffer | undefined;
      try {
        // A failed wrap is thrown once the checkpoint settled (a failed checkpoint first).
        const material = (wrapped = await r.source.wrap(Buffer.from(public_key, 'base64'), algorithm as WrappingAlgorithm).catch((err: unknown) => together(pending, Promise.reject(err))));
        timer.enter('import');
        askSlots('import');
        // The write that enters the step (none when the checkpoint recorded it as the upcoming one, as for a
        // local-store key) goes after the checkpoint and with the request; it records nothing a retry needs.
        // Both are settled before anything is thrown, so that no failure record can overtake them.
        const entered = (async () => {
          await pending;
          await step('import');
        })();
        faultPoint('before:import');
        const expires = job.request.KeyExpiration;
        await together(
          entered,
          r.kms.send(
            'ImportKeyMaterial',
            new ImportKeyMaterialCommand({
              KeyId: keyId,
              ImportToken: Buffer.from(import_token, 'base64'),
              EncryptedKeyMaterial: material,
              ExpirationModel: expires ? 'KEY_MATERIAL_EXPIRES' : 'KEY_MATERIAL_DOES_NOT_EXPIRE',
              ...(expires && job.request.aws_param.ValidTo ? { ValidTo: new Date(job.request.aws_param.ValidTo) } : {}),
            }),
          ),
        );
      } finally {
        if (wrapped) zeroize(wrapped);
      }
      faultPoint('after:import');
      // The uploaded-key resource's id is fixed here already (see the record step).
      const resourceIdFixed = job.progress.resource_id ?? randomUUID();
      // The describe requests only read: sent again, they answer the same.
      sendCheckpoint((p) => {
        p.imported = true;
        delete p.import_params;
        p.resource_id = resourceIdFixed;
      });
    }

    const described = await sendAfter('describe', () => this.describe(r.kms, keyId));

    // The resource id is checkpointed before the resource is written, so a repeated record step rewrites the
    // same resource. It normally was with the import; then this step writes the record only when it ends
    // (succeeded, step record): entering it for one write's time would cost a write of its own.
    if (job.progress.resource_id) {
      timer.enter('record');
    } else {
      const resourceIdFixed = randomUUID();
      await step('record', (j) => {
        j.progress.resource_id = resourceIdFixed;
      });
    }
    const resourceId = job.progress.resource_id as string;
    faultPoint('before:record');
    const now = new Date().toISOString();
    const resource = buildKeyResource({ id: resourceId, account: job.account, conn: r.conn, region: job.request.region, source: r.source, described, now });
    // The key resource and the record that says succeeded are written together (both or neither).
    const done = await stores.jobs.updateFrom(
      last.held,
      (j) => {
        j.status = 'succeeded';
        j.step = 'record';
        j.error = null;
        j.result = resource;
        j.finished_at = now;
      },
      stores.uploadedKeys.entry(job.account, resource),
    );
    faultPoint('after:record');
    return done;
  }

  /**
   * After a permanent failure: a key that never received material is scheduled for deletion (7 days), also
   * one that an attempt created but died before recording. `state.held`: the record as the caller last read or
   * wrote it, kept up to date here with each write (also when a later step throws). Before anything in AWS is
   * looked for or deleted (a tag lookup also deletes the extra keys it finds), a write that changes nothing
   * checks that no one else wrote the record since (JobTakenOver if so): a run that lost its job to another
   * worker must not delete the key or alias that worker goes on with. Returns the deletion date, or undefined
   * when nothing was to be deleted.
   */
  async cleanUp(state: { held: HeldJob }): Promise<string | undefined> {
    const { job } = state.held;
    const { progress } = job;
    if (!mayHaveMadeKey(progress) || progress.imported || progress.deletion_scheduled_for) return undefined;
    const kms = await this.kmsForCleanUp(job);
    if (!kms) return undefined;
    state.held = await this.deps.stores.jobs.updateFrom(state.held, () => undefined);
    const keyId = progress.kms_key_id ?? (await this.findCreatedKey(kms, job.id))?.KeyId;
    if (!keyId) return undefined;
    // The alias would otherwise keep naming the doomed key for 7 days and block a retry or a new upload. It is
    // looked for also when the record does not say it was made, and when the key was found by its tag (CreateAlias
    // goes while the key's checkpoint is on its way): a worker may have died between CreateAlias and the
    // checkpoint that records it. That look failing does not keep the key from its deletion.
    const alias = aliasNameOf(job.request);
    if (alias) {
      const look = this.deleteAliasIfOurs(kms, alias, keyId);
      await (progress.alias_created
        ? look
        : look.catch((err: unknown) => this.deps.logger.warn({ job_id: job.id, err: classify(err).message }, 'could not look for an alias the job may have made')));
    }
    const out = await kms.send('ScheduleKeyDeletion', new ScheduleKeyDeletionCommand({ KeyId: keyId, PendingWindowInDays: 7 }));
    const when = (out.DeletionDate ?? new Date(Date.now() + 7 * 86_400_000)).toISOString();
    state.held = await this.deps.stores.jobs.updateFrom(state.held, (j) => {
      j.progress.deletion_scheduled_for = when;
    });
    return when;
  }

  /**
   * After this run lost its job to another worker (JobTakenOver) having made key `keyId` itself: if the job's
   * record names another key, the other worker made or adopted that one and will never adopt this one, which
   * has no material then: it is scheduled for deletion (7 days), after the job's alias if that names it (this
   * run's CreateAlias goes out with the checkpoint that failed). While the record names no key yet, the other
   * worker may still find this one by its tag and adopt it: it is left alone ('unknown'), as it is when the
   * record names this very key ('in use').
   */
  async dropKeyOfLostRun(jobId: string, keyId: string): Promise<'scheduled' | 'in use' | 'unknown'> {
    const job = await this.deps.stores.jobs.get(jobId);
    const theirs = job?.progress.kms_key_id;
    if (theirs === keyId) return 'in use';
    if (!job || !theirs) return 'unknown';
    const kms = await this.kmsForCleanUp(job);
    if (!kms) return 'unknown';
    const alias = aliasNameOf(job.request);
    if (alias) await this.deleteAliasIfOurs(kms, alias, keyId);
    await kms.send('ScheduleKeyDeletion', new ScheduleKeyDeletionCommand({ KeyId: keyId, PendingWindowInDays: 7 }));
    return 'scheduled';
  }

  /** The job's KMS client outside the pipeline's steps; undefined if its KMS connection is gone. */
  private async kmsForCleanUp(job: JobRecord): Promise<MeteredKms | undefined> {
    const conn = await this.deps.stores.kmsConnections.find(job.account, job.kms_id);
    if (!conn) return undefined;
    // A clean-up cannot put its job back to wait for a quota slot: it waits here.
    return this.deps.quota.forJob(job, conn, this.deps.clients.get(conn, job.request.region), { mayDelay: false });
  }

  private async deleteAliasIfOurs(kms: MeteredKms, aliasName: string, keyId: string): Promise<void> {
    const mine = await kms.send('ListAliases', new ListAliasesCommand({ KeyId: keyId }));
    if (mine.Aliases?.some((a) => a.AliasName === aliasName)) await kms.send('DeleteAlias', new DeleteAliasCommand({ AliasName: aliasName }));
  }

  /**
   * Starts the lookups of the resolve step that only read Redis (the KMS connection, the policy template, a
   * key of the local store), all at once: the worker starts them with the write that starts the job. Other
   * source tiers ask their HSM or KMIP server in the resolve step itself, once the rest was found.
   */
  lookUp(job: JobRecord): Lookups {
    const { stores } = this.deps;
    const lookups: Lookups = {
      conn: stores.kmsConnections.find(job.account, job.kms_id),
      template: job.request.policytemplate ? stores.templates.find(job.account, job.request.policytemplate) : undefined,
      localSource: job.request.source_key_tier === 'local' ? this.deps.sources.resolve(job.account, job.request) : undefined,
    };
    // Each is awaited in the resolve step, unless the job does not start or an earlier check throws.
    for (const p of [lookups.conn, lookups.template, lookups.localSource]) p?.catch(() => undefined);
    return lookups;
  }

  /** The resolve step; its failures are reported in this order: connection, region, endpoint, template, source. */
  private async resolve(job: JobRecord, lookups: Lookups): Promise<Resolved> {
    const { conn: connFound, template: templateFound, localSource } = lookups;
    const conn = await connFound;
    if (!conn) throw new PipelineError('kms_connection_not_found', `The KMS connection "${job.request.kms}" no longer exists.`, false);
    if (!conn.regions.includes(job.request.region)) {
      throw new PipelineError('region_not_allowed', `The KMS connection "${conn.name}" does not serve ${job.request.region}.`, false);
    }
    const client = this.deps.clients.get(conn, job.request.region); // kms_endpoint_not_allowed before the source is asked
    let templatePolicy: string | undefined;
    if (templateFound) {
      const t = await templateFound;
      if (!t) throw new PipelineError('policy_template_not_found', `The policy template "${job.request.policytemplate}" no longer exists.`, false);
      templatePolicy = t.policy;
    }
    const source = await (localSource ?? this.deps.sources.resolve(job.account, job.request));
    const kms = this.deps.quota.forJob(job, conn, client, { mayDelay: true });
    return { conn, kms, source, policy: buildKeyPolicy(job.request, conn.account_id, templatePolicy) };
  }

  /** GetParametersForImport with the source's wrapping algorithm and the connection's wrapping key spec. */
  private async importParams(r: Resolved, keyId: string): Promise<ImportParams> {
    const keySpec = r.conn.wrapping_key_spec ?? this.deps.defaultWrappingKeySpec;
    faultPoint('before:get_import_params');
    const out = await r.kms.send(
      'GetParametersForImport',
      new GetParametersForImportCommand({ KeyId: keyId, WrappingAlgorithm: r.source.wrappingAlgorithm, WrappingKeySpec: keySpec }),
    );
    if (!out.PublicKey || !out.ImportToken || !out.ParametersValidTo) {
      throw new PipelineError('aws_bad_response', 'GetParametersForImport returned no parameters.', true);
    }
    faultPoint('after:get_import_params');
    return {
      public_key: Buffer.from(out.PublicKey).toString('base64'),
      import_token: Buffer.from(out.ImportToken).toString('base64'),
      valid_to: out.ParametersValidTo.toISOString(),
      algorithm: r.source.wrappingAlgorithm,
      key_spec: keySpec,
    };
  }

  private async createKey(r: Resolved, job: JobRecord): Promise<KeyRef> {
    const param = job.request.aws_param;
    const out = await r.kms.send(
      'CreateKey',
      new CreateKeyCommand({
        Origin: 'EXTERNAL',
        KeySpec: 'SYMMETRIC_DEFAULT',
        KeyUsage: 'ENCRYPT_DECRYPT',
        ...(r.policy !== undefined ? { Policy: r.policy } : {}),
        Description: param.Description ?? '',
        Tags: [...(param.Tags ?? []), { TagKey: JOB_TAG_KEY, TagValue: job.id }],
        MultiRegion: param.MultiRegion ?? false,
        BypassPolicyLockoutSafetyCheck: param.BypassPolicyLockoutSafetyCheck ?? false,
      }),
    );
    const { KeyId, Arn } = out.KeyMetadata ?? {};
    if (!KeyId || !Arn) throw new PipelineError('aws_bad_response', 'CreateKey returned no key id.', true);
    return { KeyId, Arn };
  }

  /**
   * The key an earlier attempt of this job created but did not record, found by its job tag; undefined when
   * that attempt died before CreateKey reached KMS. It reads the tags of every key in the account and region,
   * so it runs only when a create_key intent has no key id. Should several keys carry the tag (attempts that
   * raced), the oldest is kept and the others are scheduled for deletion.
   */
  private async findCreatedKey(kms: MeteredKms, jobId: string): Promise<KeyRef | undefined> {
    const tagged: KeyMetadata[] = [];
    let marker: string | undefined;
    do {
      const page = await retryInPlace(() => kms.send('ListKeys', new ListKeysCommand(marker ? { Marker: marker } : {})));
      for (const { KeyId } of page.Keys ?? []) {
        const meta = KeyId && (await this.describeIfTagged(kms, KeyId, jobId));
        if (meta && meta.KeyState !== 'PendingDeletion') tagged.push(meta);
      }
      marker = page.Truncated ? page.NextMarker : undefined;
    } while (marker);

    const [keep, ...others] = tagged.sort((a, b) => (a.CreationDate?.getTime() ?? 0) - (b.CreationDate?.getTime() ?? 0));
    for (const other of others) {
      await kms.send('ScheduleKeyDeletion', new ScheduleKeyDeletionCommand({ KeyId: other.KeyId, PendingWindowInDays: 7 }));
    }
    if (others.length > 0) {
      this.deps.logger.warn({ job_id: jobId, kept: keep?.KeyId, deleted: others.map((k) => k.KeyId) }, 'several keys carry the job tag: scheduled deletion of all but the oldest');
    }
    return keep?.KeyId && keep.Arn ? { KeyId: keep.KeyId, Arn: keep.Arn } : undefined;
  }

  /** DescribeKey of a key that carries this job's tag; undefined for other keys. */
  private async describeIfTagged(kms: MeteredKms, keyId: string, jobId: string): Promise<KeyMetadata | undefined> {
    // A key has at most 50 tags: one page of ListResourceTags holds them all.
    const out = await retryInPlace(() => kms.send('ListResourceTags', new ListResourceTagsCommand({ KeyId: keyId, Limit: 50 }))).catch((err: unknown) => {
      // Other keys of the account may deny us, or be deleted while we page: neither is this job's key.
      if (['AccessDeniedException', 'NotFoundException'].includes((err as Error).name)) return undefined;
      throw err;
    });
    if (!out?.Tags?.some((t) => t.TagKey === JOB_TAG_KEY && t.TagValue === jobId)) return undefined;
    return (await retryInPlace(() => kms.send('DescribeKey', new DescribeKeyCommand({ KeyId: keyId })))).KeyMetadata;
  }

  /** CreateAlias; an alias that already names this key (an earlier attempt made it) is success. */
  private async createAlias(kms: MeteredKms, aliasName: string, keyId: string): Promise<void> {
    faultPoint('before:create_alias');
    try {
      await kms.send('CreateAlias', new CreateAliasCommand({ AliasName: aliasName, TargetKeyId: keyId }));
    } catch (err) {
      if ((err as Error).name !== 'AlreadyExistsException') throw err;
      const mine = await kms.send('ListAliases', new ListAliasesCommand({ KeyId: keyId }));
      if (!mine.Aliases?.some((a) => a.AliasName === aliasName)) {
        throw new PipelineError('alias_taken', `The alias ${aliasName} already names another key in this account and region.`, false);
      }
    }
    faultPoint('after:create_alias');
  }

  private async describe(kms: MeteredKms, keyId: string): Promise<DescribeOutput> {
    const [d, p, a, t, rot] = await Promise.all([
      kms.send('DescribeKey', new DescribeKeyCommand({ KeyId: keyId })),
      kms.send('GetKeyPolicy', new GetKeyPolicyCommand({ KeyId: keyId, PolicyName: 'default' })),
      kms.send('ListAliases', new ListAliasesCommand({ KeyId: keyId })),
      kms.send('ListResourceTags', new ListResourceTagsCommand({ KeyId: keyId })),
      // AWS has answered UnsupportedOperationException here for keys with imported material: that means "not rotating".
      kms.send('GetKeyRotationStatus', new GetKeyRotationStatusCommand({ KeyId: keyId })).catch((err: Error) => {
        if (err.name === 'UnsupportedOperationException') return { KeyRotationEnabled: false };
        throw err;
      }),
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

/**
 * The key lookup makes one call per key of the account: a whole job retry per transient failure would
 * rarely get through a large account, so its calls retry in place (a few times, briefly) first.
 */
async function retryInPlace<T>(call: () => Promise<T>, tries = 5): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await call();
    } catch (err) {
      if (attempt >= tries || !classify(err).retryable) throw err;
      await new Promise((r) => setTimeout(r, 20 * 2 ** attempt));
    }
  }
}
