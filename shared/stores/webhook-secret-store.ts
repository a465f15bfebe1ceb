import { randomBytes } from 'node:crypto';
import { zeroize, type SecretBox } from '../crypto.js';
import { defineScript, type RedisClient, type RedisScript } from '../redis.js';
import type { Keyspace } from './keyspace.js';

/**
 * Makes the new secret current; the old current one becomes `previous` until ARGV[3] (or is dropped when
 * ARGV[3] is empty: no grace). Returns 1 when a previous secret is kept. One key: atomic, cluster-safe.
 * When the new (sealed, random) secret is already current, this very call ran before and ioredis sent it
 * again after a reconnect: it changes nothing, so the secret that was current before stays `previous`.
 */
const ROTATE_SCRIPT = `
local current = redis.call('HGET', KEYS[1], 'current')
if current == ARGV[1] then
  if redis.call('HEXISTS', KEYS[1], 'previous') == 1 then return 1 end
  return 0
end
local kept = 0
if current and ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'previous', current, 'previous_until', ARGV[3])
  kept = 1
else
  redis.call('HDEL', KEYS[1], 'previous', 'previous_until')
end
redis.call('HSET', KEYS[1], 'current', ARGV[1], 'created_at', ARGV[2])
return kept`;

/** What `POST /api/v1/webhooks/secret` answers: the only time the secret is shown. */
export interface RotatedSecret {
  secret: string;
  previous_valid_until: string | null;
  created_at: string;
}

/**
 * Each account's webhook signing secret (Standard Webhooks format `whsec_<base64>`), sealed at rest and
 * bound to the account. After a rotation the previous secret keeps signing for a grace period, so
 * receivers can switch secrets without rejecting a delivery.
 */
export class WebhookSecretStore {
  readonly #rotate: RedisScript;

  constructor(
    private readonly redis: RedisClient,
    private readonly keys: Keyspace,
    private readonly box: SecretBox,
  ) {
    this.#rotate = defineScript(redis, 'webhook_secret_rotate', ROTATE_SCRIPT);
  }

  static context(account: string): string {
    return `webhook-secret:${account}`;
  }

  /** Creates the account's first secret or rotates it; returns the new secret in clear. */
  async rotate(account: string, graceSeconds: number): Promise<RotatedSecret> {
    const raw = randomBytes(32);
    const secret = `whsec_${raw.toString('base64')}`;
    zeroize(raw);
    const now = Date.now();
    const until = graceSeconds > 0 ? new Date(now + graceSeconds * 1000).toISOString() : '';
    const createdAt = new Date(now).toISOString();
    const kept = await this.#rotate([this.keys.webhookSecret(account)], [this.box.seal(secret, WebhookSecretStore.context(account)), createdAt, until]);
    return { secret, previous_valid_until: kept === 1 ? until : null, created_at: createdAt };
  }

  /** The secrets that sign a delivery now: the current one, then the previous one while in grace. */
  async signingSecrets(account: string): Promise<string[]> {
    const stored = await this.redis.hgetall(this.keys.webhookSecret(account));
    const sealed = [stored.current];
    if (stored.previous_until && Date.parse(stored.previous_until) > Date.now()) sealed.push(stored.previous);
    return sealed.filter((s): s is string => s !== undefined).map((s) => this.box.openString(s, WebhookSecretStore.context(account)));
  }
}
