import { InvalidArgumentError, type Command } from 'commander';
import { signToken } from '../../shared/auth.js';
import { UsageError } from './client.js';
import { print } from './output.js';

interface TokenOptions {
  account: string;
  ttl: number;
  subject?: string;
}

/** `keyferry token`, also `npm run token`: a bearer token signed with JWT_SECRET (and JWT_ISSUER, JWT_AUDIENCE). */
export function registerToken(program: Command): void {
  program
    .command('token')
    .description('Print a bearer token signed with env JWT_SECRET (honours JWT_ISSUER and JWT_AUDIENCE).')
    .requiredOption('--account <name>', 'the account (acc claim)')
    .option('--ttl <seconds>', 'lifetime in seconds', positiveInt, 3600)
    .option('--subject <sub>', 'the sub claim (default local|<account>)')
    .action(async (opts: TokenOptions) => {
      const secret = process.env.JWT_SECRET;
      if (!secret) throw new UsageError('Set JWT_SECRET to the API\'s token secret.');
      const token = await signToken({
        secret,
        account: opts.account,
        ttlSeconds: opts.ttl,
        issuer: process.env.JWT_ISSUER,
        audience: process.env.JWT_AUDIENCE,
        ...(opts.subject !== undefined ? { subject: opts.subject } : {}),
      });
      print(token);
    });
}

function positiveInt(value: string): number {
  if (!/^[1-9]\d*$/.test(value)) throw new InvalidArgumentError('Must be a positive whole number of seconds.');
  return Number(value);
}
