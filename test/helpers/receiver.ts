import http from 'node:http';
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

/** A webhook receiver on 127.0.0.1: answers each path with its scripted answers in turn, then 200. */
export class Receiver {
  readonly received: Received[] = [];
  port = 0;
  readonly #answers = new Map<string, Answer[]>();
  readonly #server = http.createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const path = req.url ?? '/';
      this.received.push({ path, headers: req.headers as Record<string, string>, body: Buffer.concat(chunks).toString('utf8'), at: Date.now() });
      const answer = this.#answers.get(path)?.shift() ?? { status: 200 };
      setTimeout(() => res.writeHead(answer.status, answer.headers).end(), answer.delayMs ?? 0);
    });
  });

  async start(): Promise<void> {
    await new Promise<void>((resolve) => this.#server.listen(0, '127.0.0.1', resolve));
    this.port = (this.#server.address() as AddressInfo).port;
  }

  /** A URL whose host name resolves to 127.0.0.1 (not an IP literal). */
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
    this.#server.closeAllConnections();
    await new Promise((resolve) => this.#server.close(resolve));
  }
}
