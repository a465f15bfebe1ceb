import type { Socket } from 'node:net';
import type { Redis } from 'ioredis';

/**
 * Counts the socket writes of the clients' current connections while `run` runs: each call of a socket's
 * _write or _writev hands data to the kernel once.
 */
export async function socketWrites(clients: Redis[], run: () => Promise<unknown>): Promise<number> {
  let writes = 0;
  const restore = clients.map((client) => {
    const socket = client.stream as Socket & { _write: (...a: unknown[]) => void; _writev: (...a: unknown[]) => void };
    const own = { _write: socket._write, _writev: socket._writev };
    socket._write = function (...a: unknown[]) {
      writes++;
      return own._write.apply(this, a);
    };
    socket._writev = function (...a: unknown[]) {
      writes++;
      return own._writev.apply(this, a);
    };
    return () => Object.assign(socket, own);
  });
  try {
    await run();
  } finally {
    for (const r of restore) r();
  }
  return writes;
}
