import { parseArgs } from 'node:util';
import { signToken } from './auth.js';

/** `npm run token -- --account NAME [--ttl SECONDS]`: prints a bearer token signed with JWT_SECRET. */
const { values } = parseArgs({
  options: { account: { type: 'string' }, ttl: { type: 'string', default: '3600' }, subject: { type: 'string' } },
});
const secret = process.env.JWT_SECRET;
if (!values.account || !secret) {
  console.error('usage: JWT_SECRET=... npm run token -- --account NAME [--ttl SECONDS]');
  process.exit(2);
}
const ttl = Number(values.ttl);
if (!Number.isInteger(ttl) || ttl <= 0) {
  console.error('--ttl must be a positive whole number of seconds');
  process.exit(2);
}
console.log(
  await signToken({
    secret,
    account: values.account,
    ttlSeconds: ttl,
    issuer: process.env.JWT_ISSUER,
    audience: process.env.JWT_AUDIENCE,
    ...(values.subject ? { subject: values.subject } : {}),
  }),
);
