import type { z } from 'zod';
import { ValidationError, type FieldError } from './errors.js';

/** `['aws_param','Tags',0,'TagValue']` → `aws_param.Tags[0].TagValue`. */
export function formatPath(path: readonly PropertyKey[], base = ''): string {
  let out = base;
  for (const seg of path) {
    if (typeof seg === 'number') out += `[${seg}]`;
    else out += out === '' ? String(seg) : `.${String(seg)}`;
  }
  return out === '' ? '(body)' : out;
}

export function issuesToFieldErrors(issues: readonly z.core.$ZodIssue[], base = ''): FieldError[] {
  const out: FieldError[] = [];
  for (const issue of issues) {
    if (issue.code === 'unrecognized_keys') {
      for (const key of issue.keys) out.push({ path: formatPath([...issue.path, key], base), message: 'Unknown field.' });
    } else {
      out.push({ path: formatPath(issue.path, base), message: issue.message });
    }
  }
  return out;
}

/** Parses `input` with `schema`, throwing one ValidationError listing every problem. */
export function parseOrThrow<S extends z.ZodType>(schema: S, input: unknown, extra: FieldError[] = []): z.output<S> {
  const result = schema.safeParse(input);
  const errors = result.success ? [...extra] : [...issuesToFieldErrors(result.error.issues), ...extra];
  if (errors.length > 0) throw new ValidationError(errors);
  return result.data as z.output<S>;
}
