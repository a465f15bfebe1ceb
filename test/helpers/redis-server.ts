import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Redis } from 'ioredis';

/** A free TCP port on loopback (taken from the OS, then released). */
export async function freePort(): Promise<number> {
  const srv = createServer();
  await new Promise<void>((resolve) => srv.listen(0, '127.0.0.1', resolve));
  const port = (srv.address() as { port: number }).port;
  await new Promise((resolve) => srv.close(resolve));
  return port;
}

/**
 * A redis-server of the test's own, on its own port, persisting with AOF (`appendfsync always`) in a
 * temporary directory, so a test can kill and restart it without touching the shared Redis.
 */
export class OwnRedis {
  readonly dir = mkdtempSync(join(tmpdir(), 'keyferry-redis-'));
  #proc: ChildProcess | undefined;

  private constructor(readonly port: number) {}

  static async start(): Promise<OwnRedis> {
    const r = new OwnRedis(await freePort());
    await r.restart();
    return r;
  }

  get url(): string {
    return `redis://127.0.0.1:${this.port}`;
  }

  async restart(): Promise<void> {
    this.#proc = spawn('redis-server', ['--port', String(this.port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'yes', '--appendfsync', 'always', '--dir', this.dir], { stdio: 'ignore' });
    const probe = probeClient(this.port);
    try {
      await connectWhenUp(probe);
    } finally {
      probe.disconnect();
    }
  }

  /** SIGKILL: a crash, not a clean shutdown; AOF with fsync always keeps every acknowledged write. */
  async kill(): Promise<void> {
    const proc = this.#proc;
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return; // not running (killed: signalCode)
    await new Promise<void>((resolve) => {
      proc.once('exit', () => resolve());
      proc.kill('SIGKILL');
    });
  }

  async stop(): Promise<void> {
    await this.kill();
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/**
 * A Redis Cluster of the test's own: three masters, no replicas, each a redis-server on its own port (nothing
 * persisted), the 16,384 slots split between them. Resolves once every node reports `cluster_state:ok`.
 */
export class OwnRedisCluster {
  readonly dir = mkdtempSync(join(tmpdir(), 'keyferry-cluster-'));
  readonly #procs: ChildProcess[] = [];

  private constructor(
    readonly ports: number[],
    /** Each node's cluster bus port (by default its port + 10000, which fails for ports above 55535). */
    readonly busPorts: number[],
  ) {}

  static async start(size = 3): Promise<OwnRedisCluster> {
    const ports: number[] = [];
    const busPorts: number[] = [];
    for (let i = 0; i < size; i++) {
      ports.push(await freePort());
      busPorts.push(await freePort());
    }
    const cluster = new OwnRedisCluster(ports, busPorts);
    try {
      await cluster.#form();
    } catch (err) {
      await cluster.stop();
      throw err;
    }
    return cluster;
  }

  /** `host:port,…`, as REDIS_CLUSTER_NODES takes it. */
  get nodes(): string {
    return this.ports.map((p) => `127.0.0.1:${p}`).join(',');
  }

  /** The nodes as ioredis's Cluster takes them. */
  get startupNodes(): { host: string; port: number }[] {
    return this.ports.map((port) => ({ host: '127.0.0.1', port }));
  }

  async #form(): Promise<void> {
    const clients = this.ports.map((port, i) => {
      const args = ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', this.dir];
      args.push('--cluster-enabled', 'yes', '--cluster-config-file', `nodes-${port}.conf`, '--cluster-port', String(this.busPorts[i]));
      this.#procs.push(spawn('redis-server', args, { stdio: 'ignore' }));
      return probeClient(port);
    });
    try {
      for (const client of clients) await connectWhenUp(client);
      const per = Math.ceil(16_384 / clients.length);
      await Promise.all(clients.map((c, i) => c.call('CLUSTER', 'ADDSLOTSRANGE', String(i * per), String(Math.min(16_383, (i + 1) * per - 1)))));
      for (let i = 1; i < this.ports.length; i++) await clients[0]?.call('CLUSTER', 'MEET', '127.0.0.1', String(this.ports[i]), String(this.busPorts[i]));
      for (let i = 0; ; i++) {
        const infos = await Promise.all(clients.map((c) => c.call('CLUSTER', 'INFO') as Promise<string>));
        if (infos.every((info) => info.includes('cluster_state:ok') && info.includes(`cluster_known_nodes:${clients.length}`))) return;
        if (i >= 200) throw new Error('the Redis Cluster did not come up');
        await new Promise((r) => setTimeout(r, 50));
      }
    } finally {
      for (const client of clients) client.disconnect();
    }
  }

  async stop(): Promise<void> {
    await Promise.all(
      this.#procs.map(
        (proc) =>
          new Promise<void>((resolve) => {
            if (proc.exitCode !== null || proc.signalCode !== null) return resolve();
            proc.once('exit', () => resolve());
            proc.kill('SIGKILL');
          }),
      ),
    );
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** A client to a redis-server that may still be starting: it connects only when told (connectWhenUp). */
function probeClient(port: number): Redis {
  const client = new Redis(port, '127.0.0.1', { lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null });
  // Refused connections while redis-server starts are expected: each is retried, not an unhandled error.
  client.on('error', () => {});
  return client;
}

/** Connects `client` once its redis-server answers PING, trying for about 5 s. */
async function connectWhenUp(client: Redis): Promise<void> {
  for (let i = 0; i < 100; i++) {
    try {
      await client.connect();
      if ((await client.ping()) === 'PONG') return;
    } catch {
      client.disconnect();
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  throw new Error(`redis-server did not start on ${client.options.port}`);
}
