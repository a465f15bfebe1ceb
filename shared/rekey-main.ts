import { loadConfigOrExit } from './config.js';
import { createStores } from './context.js';
import { createRedis } from './redis.js';
import { rekeyAll } from './rekey.js';

/** `npm run rekey` (or `node dist/shared/rekey-main.js`): re-seals every secret under KEYFERRY_MASTER_KEY. */
const config = loadConfigOrExit();
/** How long a Redis Cluster may take to answer at first: its client keeps trying to connect for as long as it is away. */
const CONNECT_WITHIN_MS = 10_000;
/** Redis never answered: said in one line, not as a stack trace. */
class RedisAway extends Error {}

// Fails rather than waits while Redis is away: a standalone Redis's commands fail at once; a Cluster's, once it
// has been ready, and before that this command gives up after CONNECT_WITHIN_MS.
const redis = createRedis(config, { failFast: true });
try {
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([
    redis.ping(),
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new RedisAway(`Redis did not answer within ${CONNECT_WITHIN_MS / 1000} s; nothing was re-sealed.`)), CONNECT_WITHIN_MS);
    }),
  ]).finally(() => clearTimeout(timer));
  const counts = await rekeyAll(redis, createStores(config, redis));
  process.stdout.write(`${JSON.stringify({ resealed: counts })}\n`);
} catch (err) {
  if (!(err instanceof RedisAway)) throw err;
  process.stderr.write(`rekey: ${err.message}\n`);
  process.exitCode = 1;
} finally {
  redis.disconnect();
}
