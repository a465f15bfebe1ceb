import { createPrivateKey, randomUUID, X509Certificate } from 'node:crypto';
import { Router } from 'express';
import type { Stores } from '../../shared/context.js';
import { ValidationError, type FieldError } from '../../shared/errors.js';
import {
  dsmConnectionSchema,
  dsmConnectionView,
  dsmKeyContext,
  hsmConnectionSchema,
  hsmConnectionView,
  hsmPinContext,
  hsmTokenAllowed,
  hsmTokensOf,
  type DsmConnection,
  type HsmConnection,
  type HsmTokenRule,
} from '../../shared/source-connections.js';
import { parseOrThrow } from '../../shared/validation.js';
import { accountOf } from '../auth.js';
import { newResourceStamp } from '../../shared/stores/resource-store.js';

/** Connections to the HSMs (`hsm-luna` tier, PKCS#11) and KMIP servers (`dsm` tier) keys are uploaded from. */
export function sourceConnectionRoutes(deps: {
  stores: Stores;
  hsmLibraries: readonly string[];
  hsmTokens: readonly HsmTokenRule[];
  /** DSM_ALLOWED_PORTS: the ports a DSM connection may name. */
  dsmAllowedPorts: readonly { from: number; to: number }[];
}): Router {
  const { stores } = deps;
  const router = Router();

  router.post('/api/v1/cckm/hsm', async (req, res) => {
    const account = accountOf(req);
    const body = parseOrThrow(hsmConnectionSchema, req.body);
    const errors: FieldError[] = [];
    if (!deps.hsmLibraries.includes(body.library)) {
      const allowed = deps.hsmLibraries.length > 0 ? `one of ${deps.hsmLibraries.join(', ')}` : 'set by the operator in HSM_LIBRARIES (none is)';
      errors.push({ path: 'library', message: `Must be a PKCS#11 library this service allows: ${allowed}.` });
    }
    // Which tokens (partitions) an account may log in to is the operator's call: otherwise any account could
    // name another tenant's token and spend its failed-login budget guessing PINs.
    const token = { token_label: body.token_label ?? null, slot: body.slot ?? null };
    if (!hsmTokenAllowed(deps.hsmTokens, account, token)) {
      errors.push({
        path: token.token_label !== null ? 'token_label' : 'slot',
        message: `This account may not use this token: the operator lists the tokens each account may use in HSM_TOKENS (this account may use: ${hsmTokensOf(deps.hsmTokens, account)}).`,
      });
    }
    if (errors.length > 0) throw new ValidationError(errors);
    const id = randomUUID();
    const record: HsmConnection = {
      ...newResourceStamp(account, id, body.name),
      library: body.library,
      token_label: body.token_label ?? null,
      slot: body.slot ?? null,
      pin_sealed: stores.box.seal(body.pin, hsmPinContext(account, id)),
      wrapping_algorithm: body.wrapping_algorithm,
    };
    await stores.hsmConnections.create(record);
    res.status(201).location(`/api/v1/cckm/hsm/${id}`).json(hsmConnectionView(record));
  });
  router.get('/api/v1/cckm/hsm', async (req, res) => {
    const items = await stores.hsmConnections.list(accountOf(req));
    res.json({ resources: items.map(hsmConnectionView), total: items.length });
  });
  router.get('/api/v1/cckm/hsm/:id', async (req, res) => {
    res.json(hsmConnectionView(await stores.hsmConnections.get(accountOf(req), req.params.id)));
  });

  router.post('/api/v1/cckm/dsm', async (req, res) => {
    const account = accountOf(req);
    const body = parseOrThrow(dsmConnectionSchema, req.body);
    const errors = [...dsmPortErrors(deps.dsmAllowedPorts, body.port), ...certificateErrors(body.ca_certificate, body.client_certificate, body.client_key)];
    if (errors.length > 0) throw new ValidationError(errors);
    const id = randomUUID();
    const record: DsmConnection = {
      ...newResourceStamp(account, id, body.name),
      host: body.host,
      port: body.port,
      server_name: body.server_name ?? null,
      ca_certificate: body.ca_certificate,
      client_certificate: body.client_certificate,
      client_key_sealed: stores.box.seal(body.client_key, dsmKeyContext(account, id)),
      kmip_version: body.kmip_version ?? null,
    };
    await stores.dsmConnections.create(record);
    res.status(201).location(`/api/v1/cckm/dsm/${id}`).json(dsmConnectionView(record));
  });
  router.get('/api/v1/cckm/dsm', async (req, res) => {
    const items = await stores.dsmConnections.list(accountOf(req));
    res.json({ resources: items.map(dsmConnectionView), total: items.length });
  });
  router.get('/api/v1/cckm/dsm/:id', async (req, res) => {
    res.json(dsmConnectionView(await stores.dsmConnections.get(accountOf(req), req.params.id)));
  });

  return router;
}

/** The port is one DSM_ALLOWED_PORTS allows (workers check again before connecting). */
export function dsmPortErrors(allowed: readonly { from: number; to: number }[], port: number): FieldError[] {
  if (allowed.some((r) => port >= r.from && port <= r.to)) return [];
  const list = allowed.map((r) => (r.from === r.to ? `${r.from}` : `${r.from}-${r.to}`)).join(', ');
  return [{ path: 'port', message: `Must be a port this service allows for KMIP servers (DSM_ALLOWED_PORTS): ${list}.` }];
}

/** The PEMs parse, and the client key belongs to the client certificate. */
export function certificateErrors(caPem: string, certPem: string, keyPem: string): FieldError[] {
  const errors: FieldError[] = [];
  const parse = <T>(path: string, what: string, f: () => T): T | undefined => {
    try {
      return f();
    } catch {
      errors.push({ path, message: `Not a readable ${what}.` });
      return undefined;
    }
  };
  parse('ca_certificate', 'X.509 certificate (PEM)', () => new X509Certificate(caPem));
  const cert = parse('client_certificate', 'X.509 certificate (PEM)', () => new X509Certificate(certPem));
  const key = parse('client_key', 'private key (unencrypted PKCS#8 or PKCS#1 PEM)', () => createPrivateKey(keyPem));
  if (cert && key && !cert.checkPrivateKey(key)) {
    errors.push({ path: 'client_key', message: 'Does not belong to client_certificate.' });
  }
  return errors;
}
