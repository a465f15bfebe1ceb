import { loadConfigOrExit } from './config.js';
import { createStores } from './context.js';
import { createRedis } from './redis.js';
import { rekeyAll } from './rekey.js';

/** `npm run rekey` (or `node dist/shared/rekey-main.js`): re-seals every secret under KEYFERRY_MASTER_KEY. */
const config = loadConfigOrExit();
// Fails rather than waits while Redis is away (a standalone Redis; a Cluster client keeps trying to connect).
const redis = createRedis(config, { failFast: true });
try {
  const counts = await rekeyAll(redis, createStores(config, redis));
  process.stdout.write(`${JSON.stringify({ resealed: counts })}\n`);
} finally {
  redis.disconnect();
}
