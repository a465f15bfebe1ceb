import { InvalidArgumentError, type Command } from 'commander';
import { ADMIN_GROUP, signToken } from '../../shared/auth.js';
import { UsageError } from './client.js';
import { print } from './output.js';

interface TokenOptions {
  account: string;
  ttl: number;
  subject?: string;
  admin?: boolean;
}

/**
 * `keyferry token`, also `npm run token`: a bearer token signed with JWT_SECRET (and JWT_ISSUER, JWT_AUDIENCE).
 * It names no group; `--admin` adds the `admin` group, which opens the queue dashboard (/admin/queues).
 */
export function registerToken(program: Command): void {
  program
    .command('token')
    .description('Print a bearer token signed with env JWT_SECRET (honours JWT_ISSUER and JWT_AUDIENCE).')
    .requiredOption('--account <name>', 'the account (acc claim)')
    .option('--ttl <seconds>', 'lifetime in seconds', positiveInt, 3600)
    .option('--subject <sub>', 'the sub claim (default local|<account>)')
    .option('--admin', 'put the token in the operators\' group (env ADMIN_GROUP, default admin), for the queue dashboard at /admin/queues')
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
        groups: opts.admin ? [process.env.ADMIN_GROUP || ADMIN_GROUP] : [],
      });
      print(token);
    });
}

function positiveInt(value: string): number {
  if (!/^[1-9]\d*$/.test(value)) throw new InvalidArgumentError('Must be a positive whole number of seconds.');
  return Number(value);
}
