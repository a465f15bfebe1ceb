import { randomBytes, randomUUID } from 'node:crypto';
import { Router } from 'express';
import type { Stores } from '../../shared/context.js';
import { zeroize } from '../../shared/crypto.js';
import {
  kmsConnectionSchema,
  kmsConnectionView,
  kmsSecretContext,
  localKeyContext,
  localKeySchema,
  localKeyView,
  templateSchema,
  templateView,
  type KmsConnection,
  type LocalKey,
  type PolicyTemplate,
} from '../../shared/resources.js';
import { ValidationError } from '../../shared/errors.js';
import { kmsEndpointProblem, type KmsEndpointPolicy } from '../../shared/kms-endpoints.js';
import { parseOrThrow } from '../../shared/validation.js';
import { accountOf } from '../auth.js';
import { newResourceStamp } from '../../shared/stores/resource-store.js';

/** KMS connections, policy templates and the local key store: create, list, get. */
export function resourceRoutes(deps: { stores: Stores; endpoints: KmsEndpointPolicy }): Router {
  const { stores } = deps;
  const router = Router();

  router.post('/api/v1/cckm/aws/kms', async (req, res) => {
    const account = accountOf(req);
    const body = parseOrThrow(kmsConnectionSchema, req.body);
    const endpointProblem = body.endpoint === undefined ? undefined : kmsEndpointProblem(body.endpoint, deps.endpoints, body.regions);
    if (endpointProblem) throw new ValidationError([{ path: 'endpoint', message: endpointProblem }]);
    const id = randomUUID();
    const record: KmsConnection = {
      ...newResourceStamp(account, id, body.name),
      account_id: body.account_id,
      regions: body.regions,
      credentials:
        body.aws_access_key_id && body.aws_secret_access_key
          ? {
              type: 'access_key',
              access_key_id: body.aws_access_key_id,
              secret_sealed: stores.box.seal(body.aws_secret_access_key, kmsSecretContext(account, id)),
            }
          : { type: 'default' },
      endpoint: body.endpoint ?? null,
      wrapping_key_spec: body.wrapping_key_spec ?? null,
      ...(body.quotas ? { quotas: body.quotas } : {}),
    };
    await stores.kmsConnections.create(record);
    res.status(201).location(`/api/v1/cckm/aws/kms/${id}`).json(kmsConnectionView(record));
  });
  router.get('/api/v1/cckm/aws/kms', async (req, res) => {
    const items = await stores.kmsConnections.list(accountOf(req));
    res.json({ resources: items.map(kmsConnectionView), total: items.length });
  });
  router.get('/api/v1/cckm/aws/kms/:id', async (req, res) => {
    res.json(kmsConnectionView(await stores.kmsConnections.get(accountOf(req), req.params.id)));
  });

  router.post('/api/v1/cckm/aws/templates', async (req, res) => {
    const account = accountOf(req);
    const body = parseOrThrow(templateSchema, req.body);
    const id = randomUUID();
    const record: PolicyTemplate = { ...newResourceStamp(account, id, body.name), policy: body.policy };
    await stores.templates.create(record);
    res.status(201).location(`/api/v1/cckm/aws/templates/${id}`).json(templateView(record));
  });
  router.get('/api/v1/cckm/aws/templates', async (req, res) => {
    const items = await stores.templates.list(accountOf(req));
    res.json({ resources: items.map(templateView), total: items.length });
  });
  router.get('/api/v1/cckm/aws/templates/:id', async (req, res) => {
    res.json(templateView(await stores.templates.get(accountOf(req), req.params.id)));
  });

  router.post('/api/v1/vault/keys2', async (req, res) => {
    const account = accountOf(req);
    const body = parseOrThrow(localKeySchema, req.body);
    const id = randomBytes(32).toString('hex');
    const material = body.material ? Buffer.from(body.material, 'hex') : randomBytes(32);
    const record: LocalKey = {
      ...newResourceStamp(account, id, body.name),
      algorithm: body.algorithm,
      size: body.size,
      origin: body.material ? 'imported' : 'generated',
      material_sealed: stores.box.seal(material, localKeyContext(account, id)),
    };
    zeroize(material);
    await stores.localKeys.create(record);
    res.status(201).location(`/api/v1/vault/keys2/${id}`).json(localKeyView(record));
  });
  router.get('/api/v1/vault/keys2', async (req, res) => {
    const items = await stores.localKeys.list(accountOf(req));
    res.json({ resources: items.map(localKeyView), total: items.length });
  });
  router.get('/api/v1/vault/keys2/:id', async (req, res) => {
    res.json(localKeyView(await stores.localKeys.get(accountOf(req), req.params.id)));
  });

  return router;
}
