import type { Command } from 'commander';
import { EventSource } from 'eventsource';
import type { FieldError } from '../../shared/errors.js';

/** The shapes of the API's resources, as far as the CLI reads them. */
export interface Problem {
  status: number;
  code: string;
  detail: string;
  errors?: FieldError[];
  /** A waited upload that failed carries its final job. */
  job?: Job;
}

export interface Job {
  id: string;
  status: string;
  step: string | null;
  attempts: number;
  max_attempts?: number;
  error: { code: string; message: string; retryable: boolean } | null;
  result: KeyResource | null;
  batch_id: string | null;
}

export interface KeyResource {
  id: string;
  local_key_name?: string;
  region?: string;
  aws_param: { Arn?: string; KeyState?: string; Alias?: string[] };
}

export interface Counts {
  queued: number;
  running: number;
  retrying: number;
  succeeded: number;
  failed: number;
  canceled: number;
}

export interface Batch {
  id: string;
  status: 'running' | 'completed';
  total: number;
  counts: Counts;
}

export const FINAL_JOB_STATUSES = ['succeeded', 'failed', 'canceled'];

/** The command line was wrong (exit code 2). */
export class UsageError extends Error {}

/** The API answered a problem (exit code 1). */
export class ApiProblem extends Error {
  constructor(readonly problem: Problem) {
    super(problem.detail);
  }
}

export interface Reply {
  status: number;
  headers: Headers;
  body: unknown;
}

export class Api {
  private readonly base: string;

  constructor(
    url: string,
    private readonly token: string,
  ) {
    this.base = url.replace(/\/+$/, '');
  }

  /** Sends a JSON request; an error status throws ApiProblem, an unreachable server throws Error. */
  async send(method: string, path: string, opts: { body?: unknown; headers?: Record<string, string> } = {}): Promise<Reply> {
    const headers: Record<string, string> = { accept: 'application/json', authorization: `Bearer ${this.token}`, ...opts.headers };
    if (opts.body !== undefined) headers['content-type'] = 'application/json';
    const res = await fetch(this.base + path, {
      method,
      headers,
      ...(opts.body !== undefined ? { body: JSON.stringify(opts.body) } : {}),
    }).catch((err: Error & { cause?: { code?: string; message?: string } }) => {
      throw new Error(`Cannot reach ${this.base}: ${err.cause?.code ?? err.cause?.message ?? err.message}.`);
    });
    const text = await res.text();
    const body = parseJson(text);
    if (!res.ok) throw new ApiProblem(asProblem(res, body, text));
    return { status: res.status, headers: res.headers, body };
  }

  async get<T>(path: string): Promise<T> {
    return (await this.send('GET', path)).body as T;
  }

  /** An EventSource on an API stream, authenticated like every other request. */
  events(path: string): EventSource {
    return new EventSource(this.base + path, {
      fetch: (input, init) => fetch(input, { ...init, headers: { ...init.headers, authorization: `Bearer ${this.token}` } }),
    });
  }
}

/** The API client configured by the global --url and --token options (or KEYFERRY_URL, KEYFERRY_TOKEN). */
export function apiOf(cmd: Command): Api {
  const { url, token } = cmd.optsWithGlobals<{ url: string; token?: string }>();
  if (!token) throw new UsageError('No bearer token: set KEYFERRY_TOKEN or pass --token (see `keyferry token`).');
  return new Api(url, token);
}

function parseJson(text: string): unknown {
  try {
    return text ? JSON.parse(text) : undefined;
  } catch {
    return undefined;
  }
}

function asProblem(res: Response, body: unknown, text: string): Problem {
  if (typeof body === 'object' && body !== null && 'detail' in body) return body as Problem;
  return { status: res.status, code: `http_${res.status}`, detail: text.trim().slice(0, 200) || res.statusText };
}
