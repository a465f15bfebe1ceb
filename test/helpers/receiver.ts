import http, { type Server } from 'node:http';
import type { AddressInfo } from 'node:net';

export interface Answer {
  status: number;
  headers?: Record<string, string>;
  delayMs?: number;
}

export interface Received {
  path: string;
  headers: Record<string, string>;
  body: string;
  at: number;
}

/** Servers on one port of both loopback addresses, as listenOnLoopback made them. */
export interface LoopbackServers {
  port: number;
  close(): Promise<void>;
}

const listenOn = (server: Server, port: number, host: string) =>
  new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      server.off('error', reject);
      resolve();
    });
  });

/**
 * One server of `create`'s on 127.0.0.1 and another on ::1, on the same free port (only the first where the
 * machine has no IPv6 loopback): `localhost` resolves to both, and a client that tries ::1 first (Node's
 * happy eyeballs, whose 250 ms per address a loaded machine can overrun) must not be refused. Loopback only.
 */
export async function listenOnLoopback(create: () => Server): Promise<LoopbackServers> {
  for (let tries = 0; ; tries++) {
    const v4 = create();
    await listenOn(v4, 0, '127.0.0.1');
    const port = (v4.address() as AddressInfo).port;
    const servers = [v4];
    const v6 = create();
    try {
      await listenOn(v6, port, '::1');
      servers.push(v6);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'EADDRINUSE' && tries < 5) {
        await new Promise((resolve) => v4.close(resolve));
        continue;
      }
      if (code !== 'EADDRNOTAVAIL' && code !== 'EAFNOSUPPORT') throw err;
    }
    const close = async () => {
      await Promise.all(
        servers.map(
          (s) =>
            new Promise<void>((resolve) => {
              s.close(() => resolve());
              (s as { closeAllConnections?: () => void }).closeAllConnections?.(); // http's and https's servers
            }),
        ),
      );
    };
    return { port, close };
  }
}

/** A webhook receiver on loopback: answers each path with its scripted answers in turn, then 200. */
export class Receiver {
  readonly received: Received[] = [];
  port = 0;
  readonly #answers = new Map<string, Answer[]>();
  #servers: LoopbackServers | undefined;

  readonly #handle = (req: http.IncomingMessage, res: http.ServerResponse) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const path = req.url ?? '/';
      this.received.push({ path, headers: req.headers as Record<string, string>, body: Buffer.concat(chunks).toString('utf8'), at: Date.now() });
      const answer = this.#answers.get(path)?.shift() ?? { status: 200 };
      setTimeout(() => res.writeHead(answer.status, answer.headers).end(), answer.delayMs ?? 0);
    });
  };

  async start(): Promise<void> {
    this.#servers = await listenOnLoopback(() => http.createServer(this.#handle));
    this.port = this.#servers.port;
  }

  /** A URL whose host name resolves to loopback (not an IP literal). */
  url(path: string): string {
    return `http://localhost:${this.port}${path}`;
  }

  answer(path: string, ...answers: Answer[]): void {
    this.#answers.set(path, answers);
  }

  at(path: string): Received[] {
    return this.received.filter((r) => r.path === path);
  }

  async close(): Promise<void> {
    await this.#servers?.close();
  }
}
