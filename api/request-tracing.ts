import type { RequestHandler } from 'express';
import { tracingApi } from '../shared/tracing.js';
import { QUIET } from './request-id.js';

/**
 * A SERVER span per request while tracing is on (undefined while it is off, so that nothing is added): it
 * continues the caller's trace when the request carries W3C `traceparent`, and is the active span while the
 * request is handled, so the BullMQ `add` span of an accepted upload is its child. Any caller, before its token
 * is checked, chooses the trace id and the sampled flag of its own request's trace; its baggage is dropped.
 * Named `METHOD /route` once a route answered (the method alone otherwise), with the method, the path (never
 * the query), the route and the status; a 5xx marks it as an error. Headers and bodies are not recorded.
 * Probes, scrapes and the API docs (those whose access lines are debug only) get none.
 */
export function traceRequests(): RequestHandler | undefined {
  const api = tracingApi();
  if (!api) return undefined;
  const { otel, tracer } = api;
  return (req, res, next) => {
    if (QUIET.test(req.path)) return next(); // probes, scrapes and the API docs: no spans
    // The caller's trace context only: its `baggage` (up to 8 KB) would otherwise be stored with every job
    // the request adds, and go on to the worker.
    const parent = otel.propagation.deleteBaggage(otel.propagation.extract(otel.ROOT_CONTEXT, req.headers));
    const span = tracer.startSpan(req.method, { kind: otel.SpanKind.SERVER, attributes: { 'http.request.method': req.method, 'url.path': req.path } }, parent);
    res.once('close', () => {
      // The route that answered, when one did: a route with one path (the intake's rate limit is an app-level
      // route for two paths; a request it or a later middleware answered is named by its method alone).
      const path: unknown = req.route?.path;
      if (typeof path === 'string') {
        const route = `${req.baseUrl}${path}`;
        span.updateName(`${req.method} ${route}`);
        span.setAttribute('http.route', route);
      }
      if (res.headersSent) span.setAttribute('http.response.status_code', res.statusCode);
      if (res.statusCode >= 500) span.setStatus({ code: otel.SpanStatusCode.ERROR });
      if (!res.writableFinished) span.setAttribute('keyferry.response_incomplete', true);
      span.end();
    });
    otel.context.with(otel.trace.setSpan(parent, span), next);
  };
}
