import { Router } from 'express';
import type { Stores } from '../../shared/context.js';
import { NotFoundError } from '../../shared/errors.js';
import type { WebhookSecretStore } from '../../shared/stores/webhook-secret-store.js';
import type { WebhookDeliveries } from '../../shared/webhooks.js';
import { accountOf } from '../auth.js';

export interface WebhookRouteDeps {
  stores: Stores;
  secrets: WebhookSecretStore;
  deliveries: WebhookDeliveries;
  /** WEBHOOK_SECRET_GRACE_SECONDS: how long the previous secret keeps signing after a rotation. */
  graceSeconds: number;
  /** Whether the account owns a batch of that id. */
  ownsBatch: (account: string, id: string) => Promise<boolean>;
}

/** The account's webhook signing secret, and the delivery attempts of a job's or a batch's webhooks. */
export function webhookRoutes(deps: WebhookRouteDeps): Router {
  const router = Router();

  router.post('/api/v1/webhooks/secret', async (req, res) => {
    const rotated = await deps.secrets.rotate(accountOf(req), deps.graceSeconds);
    res.status(201).set('Cache-Control', 'no-store').json(rotated);
  });

  router.get('/api/v1/jobs/:id/deliveries', async (req, res) => {
    const job = await deps.stores.jobs.getOwned(accountOf(req), req.params.id);
    if (!job) throw new NotFoundError(`The job "${req.params.id}"`);
    res.json({ deliveries: await deps.deliveries.list(job.id) });
  });

  router.get('/api/v1/batches/:id/deliveries', async (req, res) => {
    const account = accountOf(req);
    if (!(await deps.ownsBatch(account, req.params.id))) throw new NotFoundError(`The batch "${req.params.id}"`);
    res.json({ deliveries: await deps.deliveries.list(req.params.id) });
  });

  return router;
}
