import type { RequestHandler } from 'express';
import { defineScript, type RedisClient } from '../shared/redis.js';
import type { Keyspace } from '../shared/stores/keyspace.js';
import { accountOf } from './auth.js';
import { problem, sendProblem } from './problem.js';

/**
 * A token bucket in one hash: `tokens` left at `at` (ms, Redis's clock, so every API process agrees).
 * The bucket refills at ARGV[1] tokens per second up to ARGV[2]; a request takes one token. Returns 0
 * when the request may pass, else the milliseconds until a token is back. The key expires once the
 * bucket would be full again, when it is the same as no key.
 */
const TOKEN_BUCKET = `
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate / 1000)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = math.ceil((1 - tokens) * 1000 / rate) end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'at', now)
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) * 1000 / rate) + 1)
return wait
`;

export interface RateLimitOptions {
  redis: RedisClient;
  /** The bucket is `keys.rateLimit(account)`, in the account's slot. */
  keys: Keyspace;
  ratePerSecond: number;
  burst: number;
}

/** Per-account request rate limit (behind requireAuth): over it, `429` problem + `Retry-After` seconds. */
export function accountRateLimit(opts: RateLimitOptions): RequestHandler {
  const takeToken = defineScript(opts.redis, 'token_bucket', TOKEN_BUCKET);
  return async (req, res, next) => {
    const key = opts.keys.rateLimit(accountOf(req));
    const waitMs = Number(await takeToken([key], [opts.ratePerSecond, opts.burst]));
    if (waitMs === 0) return next();
    res.setHeader('Retry-After', String(Math.ceil(waitMs / 1000)));
    sendProblem(res, problem(429, 'rate_limited', `This account sends intake requests faster than ${opts.ratePerSecond} per second; retry later.`, { instance: req.originalUrl }));
  };
}
