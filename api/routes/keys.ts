import { Router } from 'express';
import type { Stores } from '../../shared/context.js';
import { NotFoundError } from '../../shared/errors.js';
import { accountOf } from '../auth.js';

export function keyRoutes(deps: { stores: Stores }): Router {
  const router = Router();
  router.get('/api/v1/cckm/aws/keys/:id', async (req, res) => {
    const key = await deps.stores.uploadedKeys.getOwned(accountOf(req), req.params.id);
    if (!key) throw new NotFoundError(`The key "${req.params.id}"`);
    res.json(key);
  });
  return router;
}
