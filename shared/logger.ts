import { pino, type Logger } from 'pino';

/** Paths never written to a log line: key material, secrets, tokens, credentials. */
export const redactPaths = [
  'material',
  '*.material',
  '*.*.material',
  'secret',
  '*.secret',
  '*.aws_secret_access_key',
  'aws_secret_access_key',
  'authorization',
  '*.authorization',
  'req.headers.authorization',
  'token',
  '*.token',
  'pin',
  '*.pin',
  'client_key',
  '*.client_key',
  'importToken',
  '*.importToken',
  '*.ImportToken',
  '*.EncryptedKeyMaterial',
  '*.Plaintext',
];

export const REDACTED = '[redacted]';

/**
 * The redaction paths that name a top-level key. A log line whose values are all scalars can only match
 * these; pino redacts them as it writes each key, where the paths into nested values make it copy every line.
 */
export const topLevelRedactPaths = redactPaths.filter((p) => !p.includes('.'));

export function createLogger(level = 'info', name = 'keyferry', destination?: NodeJS.WritableStream): Logger {
  return pino(
    { name, level, redact: { paths: redactPaths, censor: REDACTED }, base: { pid: process.pid } },
    destination as never,
  );
}

export type { Logger };

/** Exits 0 once `shutdown` settles, or 1, logged, if it fails: the end of a process's SIGTERM handler. */
export function exitAfter(shutdown: Promise<unknown>, logger: Logger): void {
  shutdown.then(
    () => process.exit(0),
    (err: unknown) => {
      logger.error({ err }, 'shutdown failed');
      process.exit(1);
    },
  );
}
