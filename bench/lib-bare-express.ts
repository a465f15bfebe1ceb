/**
 * The bare Express 5 JSON endpoint the intake benchmarks compare keyferry with: express.json, then a 202 with a
 * small JSON body. Run as a process of its own (`node --import tsx bench/lib-bare-express.ts`), it listens on an
 * ephemeral loopback port and prints `{"msg":"bare listening","url":…}`.
 */
import type { AddressInfo } from 'node:net';
import { pathToFileURL } from 'node:url';
import express, { type Express } from 'express';

export function createBareApp(): Express {
  const app = express();
  app.use(express.json());
  app.post('/upload-key', (req, res) => {
    res.status(202).json({ id: 'bare', status: 'queued', alias: (req.body as { aws_param?: { Alias?: string } })?.aws_param?.Alias });
  });
  return app;
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  const server = createBareApp().listen(0, '127.0.0.1', () => {
    console.log(JSON.stringify({ msg: 'bare listening', url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/upload-key` }));
  });
  process.once('SIGTERM', () => server.close(() => process.exit(0)));
}
