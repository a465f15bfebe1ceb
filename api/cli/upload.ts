import { readFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { InvalidArgumentError, Option, type Command } from 'commander';
import { SOURCE_KEY_TIERS } from '../../shared/schemas/upload-key.js';
import { apiOf, ApiProblem, FINAL_JOB_STATUSES, type Api, type Job, type KeyResource, type Reply } from './client.js';
import { EXIT_FAILED, EXIT_OK, jobSummary, keySummary, print, printJson, wantsJson } from './output.js';

export interface Tag {
  TagKey: string;
  TagValue: string;
}

interface UploadOptions {
  sourceKeyIdentifier: string;
  sourceKeyTier?: string;
  sourceConnection?: string;
  region: string;
  kms: string;
  keyExpiration?: true;
  alias?: string;
  description?: string;
  multiRegion?: true;
  bypassPolicyLockoutSafetyCheck?: true;
  policy?: string;
  tag?: Tag[];
  validTo?: string;
  externalAccount?: string[];
  keyAdmin?: string[];
  keyAdminRole?: string[];
  keyUser?: string[];
  keyUserRole?: string[];
  policytemplate?: string;
  callbackUrl?: string;
  idempotencyKey?: string;
  wait?: number;
}

type Outcome = { key: KeyResource } | { job: Job };

const DEFAULT_POLL_MS = 2000;

/** `KEY=VALUE` as an AWS tag; undefined without a `=` or with an empty key. */
export function parseTag(text: string): Tag | undefined {
  const eq = text.indexOf('=');
  return eq > 0 ? { TagKey: text.slice(0, eq), TagValue: text.slice(eq + 1) } : undefined;
}

/** The object without its undefined members and empty arrays or objects. */
export function compact(obj: Record<string, unknown>): Record<string, unknown> {
  const isEmpty = (v: unknown) => v === undefined || (typeof v === 'object' && v !== null && Object.keys(v).length === 0);
  return Object.fromEntries(Object.entries(obj).filter(([, v]) => !isEmpty(v)));
}

export function registerUpload(program: Command): void {
  const collect = <T>(parse: (s: string) => T) => (value: string, previous: T[] | undefined) => [...(previous ?? []), parse(value)];
  const text = (s: string) => s;
  program
    .command('upload')
    .description('Upload a key (local, HSM or KMIP) into AWS KMS (POST /api/v1/cckm/aws/upload-key).')
    .requiredOption('--source-key-identifier <id>', 'id or name of the source key')
    .addOption(new Option('--source-key-tier <tier>', 'where the source key lives').choices(SOURCE_KEY_TIERS))
    .option('--source-connection <name>', 'the HSM (hsm-luna) or KMIP (dsm) connection holding the key')
    .requiredOption('--region <region>', 'AWS region, e.g. ap-south-1')
    .requiredOption('--kms <name>', 'name or id of the KMS connection')
    .option('--key-expiration', 'the key material expires at --valid-to')
    .option('--alias <alias>', 'aws_param.Alias')
    .option('--description <text>', 'aws_param.Description')
    .option('--multi-region', 'aws_param.MultiRegion')
    .option('--bypass-policy-lockout-safety-check', 'aws_param.BypassPolicyLockoutSafetyCheck')
    .option('--policy <json|@file>', 'aws_param.Policy: a JSON key policy, or @file to read it', parsePolicy)
    .option('--tag <KEY=VALUE>', 'aws_param.Tags (repeatable)', collect(tagArg))
    .option('--valid-to <date-time>', 'aws_param.ValidTo (RFC 3339)')
    .option('--external-account <id>', 'external_accounts (repeatable)', collect(text))
    .option('--key-admin <name|arn>', 'key_admins (repeatable)', collect(text))
    .option('--key-admin-role <name|arn>', 'key_admins_roles (repeatable)', collect(text))
    .option('--key-user <name|arn>', 'key_users (repeatable)', collect(text))
    .option('--key-user-role <name|arn>', 'key_users_roles (repeatable)', collect(text))
    .option('--policytemplate <name>', 'name or id of a policy template')
    .option('--callback-url <url>', 'URL told when the job ends')
    .option('--idempotency-key <key>', 'the same key and body answer the same job')
    .addOption(
      new Option('--wait [seconds]', 'wait for the key (Prefer: wait=N), then poll the job until it ends')
        .preset('30')
        .argParser(secondsArg),
    )
    .action(async (opts: UploadOptions, cmd: Command) => {
      const outcome = await upload(apiOf(cmd), opts);
      process.exitCode = show(outcome, wantsJson(cmd));
    });
}

function parsePolicy(value: string): string {
  if (!value.startsWith('@')) return value;
  try {
    return readFileSync(value.slice(1), 'utf8');
  } catch (err) {
    throw new InvalidArgumentError(`Cannot read ${value.slice(1)}: ${(err as NodeJS.ErrnoException).code ?? String(err)}.`);
  }
}

function tagArg(value: string): Tag {
  const tag = parseTag(value);
  if (!tag) throw new InvalidArgumentError('Must be KEY=VALUE.');
  return tag;
}

function secondsArg(value: string): number {
  if (!/^\d+$/.test(value)) throw new InvalidArgumentError('Must be a whole number of seconds.');
  return Number(value);
}

function uploadBody(o: UploadOptions): Record<string, unknown> {
  return compact({
    source_key_tier: o.sourceKeyTier,
    source_connection: o.sourceConnection,
    source_key_identifier: o.sourceKeyIdentifier,
    region: o.region,
    kms: o.kms,
    KeyExpiration: o.keyExpiration,
    aws_param: compact({
      Alias: o.alias,
      Description: o.description,
      MultiRegion: o.multiRegion,
      BypassPolicyLockoutSafetyCheck: o.bypassPolicyLockoutSafetyCheck,
      Policy: o.policy,
      Tags: o.tag,
      ValidTo: o.validTo,
    }),
    external_accounts: o.externalAccount,
    key_admins: o.keyAdmin,
    key_admins_roles: o.keyAdminRole,
    key_users: o.keyUser,
    key_users_roles: o.keyUserRole,
    policytemplate: o.policytemplate,
    callback_url: o.callbackUrl,
  });
}

/** Posts the upload; with --wait, answers the key or the finished job. */
async function upload(api: Api, o: UploadOptions): Promise<Outcome> {
  const headers: Record<string, string> = {};
  if (o.idempotencyKey !== undefined) headers['idempotency-key'] = o.idempotencyKey;
  if (o.wait !== undefined) headers.prefer = `wait=${o.wait}`;
  let reply: Reply;
  try {
    reply = await api.send('POST', '/api/v1/cckm/aws/upload-key', { body: uploadBody(o), headers });
  } catch (err) {
    // A waited upload that failed in time answers a problem holding the failed job.
    if (err instanceof ApiProblem && err.problem.job) return { job: err.problem.job };
    throw err;
  }
  if (reply.status === 201) return { key: reply.body as KeyResource };
  const job = reply.body as Job;
  if (o.wait === undefined) return { job };
  const retryAfter = Number(reply.headers.get('retry-after'));
  return outcomeOf(await pollJob(api, job, retryAfter > 0 ? retryAfter * 1000 : DEFAULT_POLL_MS));
}

async function pollJob(api: Api, job: Job, intervalMs: number): Promise<Job> {
  while (!FINAL_JOB_STATUSES.includes(job.status)) {
    await sleep(intervalMs);
    job = await api.get<Job>(`/api/v1/jobs/${job.id}`);
  }
  return job;
}

function outcomeOf(job: Job): Outcome {
  return job.status === 'succeeded' && job.result ? { key: job.result } : { job };
}

/** Prints the key or the job; answers the exit code (1 when the job failed or was canceled). */
function show(outcome: Outcome, json: boolean): number {
  if ('key' in outcome) {
    if (json) printJson(outcome.key);
    else print(keySummary(outcome.key));
    return EXIT_OK;
  }
  if (json) printJson(outcome.job);
  else print(jobSummary(outcome.job));
  return ['failed', 'canceled'].includes(outcome.job.status) ? EXIT_FAILED : EXIT_OK;
}
