import type { RequestHandler } from 'express';
import { tracingApi } from '../shared/tracing.js';
import { QUIET } from './request-id.js';

/**
 * A SERVER span per request while tracing is on (undefined while it is off, so that nothing is added): it
 * continues the caller's trace when the request carries W3C `traceparent`, and is the active span while the
 * request is handled, so the BullMQ `add` span of an accepted upload is its child. Named `METHOD /route` once
 * the router matched one (the method alone otherwise), with the method, the path (never the query), the
 * route and the status; a 5xx marks it as an error. Headers and bodies are not recorded. Probes, scrapes and
 * the API docs (those whose access lines are debug only) get none.
 */
export function traceRequests(): RequestHandler | undefined {
  const api = tracingApi();
  if (!api) return undefined;
  const { otel, tracer } = api;
  return (req, res, next) => {
    if (QUIET.test(req.path)) return next(); // probes, scrapes and the API docs: no spans
    const parent = otel.propagation.extract(otel.ROOT_CONTEXT, req.headers);
    const span = tracer.startSpan(req.method, { kind: otel.SpanKind.SERVER, attributes: { 'http.request.method': req.method, 'url.path': req.path } }, parent);
    res.once('close', () => {
      const route = req.route ? `${req.baseUrl}${String(req.route.path)}` : undefined;
      if (route) {
        span.updateName(`${req.method} ${route}`);
        span.setAttribute('http.route', route);
      }
      span.setAttribute('http.response.status_code', res.statusCode);
      if (res.statusCode >= 500) span.setStatus({ code: otel.SpanStatusCode.ERROR });
      if (!res.writableFinished) span.setAttribute('keyferry.response_incomplete', true);
      span.end();
    });
    otel.context.with(otel.trace.setSpan(parent, span), next);
  };
}
