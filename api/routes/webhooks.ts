import { Router } from 'express';
import type { Stores } from '../../shared/context.js';
import { NotFoundError, ValidationError } from '../../shared/errors.js';
import type { WebhookSecretStore } from '../../shared/stores/webhook-secret-store.js';
import type { GoneUrls, WebhookDeliveries } from '../../shared/webhooks.js';
import { accountOf } from '../auth.js';

export interface WebhookRouteDeps {
  stores: Stores;
  secrets: WebhookSecretStore;
  deliveries: WebhookDeliveries;
  gone: GoneUrls;
  /** WEBHOOK_SECRET_GRACE_SECONDS: how long the previous secret keeps signing after a rotation. */
  graceSeconds: number;
  /** Whether the account owns a batch of that id. */
  ownsBatch: (account: string, id: string) => Promise<boolean>;
}

/**
 * The account's webhook signing secret, the delivery attempts of a job's or a batch's webhooks, and the URLs
 * that answered 410 Gone (listed, and cleared one by one once the receiver is back).
 */
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

  router.get('/api/v1/webhooks/gone', async (req, res) => {
    res.set('Cache-Control', 'no-store').json({ urls: await deps.gone.list(accountOf(req)) });
  });

  router.delete('/api/v1/webhooks/gone', async (req, res) => {
    const url = req.query.url;
    if (typeof url !== 'string' || url === '') throw new ValidationError([{ path: 'url', message: 'One `url` query parameter: the URL to deliver to again.' }]);
    if (!(await deps.gone.remove(accountOf(req), url))) throw new NotFoundError('That URL among the gone ones');
    res.status(204).end();
  });

  return router;
}
