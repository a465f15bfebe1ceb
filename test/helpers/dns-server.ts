import dgram from 'node:dgram';
import type { AddressInfo } from 'node:net';

/**
 * A small authoritative DNS server over UDP on 127.0.0.1, for the resolver's tests: it answers A and AAAA
 * queries for the names in `records` (NODATA for a type a name lacks, NXDOMAIN for unknown names) and never
 * answers names in `silent`, as a DNS server that hangs would. One question per query, as c-ares sends.
 */
export class TestDnsServer {
  readonly #socket = dgram.createSocket('udp4');
  /** Queries received, by name. */
  readonly asked: string[] = [];

  constructor(
    private readonly records: Record<string, { a?: string[]; aaaa?: string[] }>,
    private readonly silent: Set<string> = new Set(),
  ) {
    this.#socket.on('message', (msg, peer) => {
      const reply = this.#answer(msg);
      if (reply) this.#socket.send(reply, peer.port, peer.address);
    });
  }

  async listen(): Promise<string> {
    await new Promise<void>((resolve) => this.#socket.bind(0, '127.0.0.1', resolve));
    return `127.0.0.1:${(this.#socket.address() as AddressInfo).port}`;
  }

  async close(): Promise<void> {
    await new Promise<void>((resolve) => this.#socket.close(() => resolve()));
  }

  #answer(msg: Buffer): Buffer | undefined {
    const labels: string[] = [];
    let at = 12;
    for (let len = msg[at] ?? 0; len > 0; len = msg[at] ?? 0) {
      labels.push(msg.subarray(at + 1, at + 1 + len).toString('latin1'));
      at += len + 1;
    }
    const questionEnd = at + 5; // the zero label, QTYPE, QCLASS
    const qtype = msg.readUInt16BE(at + 1);
    const name = labels.join('.').toLowerCase();
    this.asked.push(name);
    if (this.silent.has(name)) return undefined;
    const record = this.records[name];
    const addresses = qtype === 1 ? (record?.a ?? []) : qtype === 28 ? (record?.aaaa ?? []) : [];
    const header = Buffer.alloc(12);
    msg.copy(header, 0, 0, 2); // the query's id
    header.writeUInt16BE(0x8400 | (msg.readUInt16BE(2) & 0x0100) | (record ? 0 : 3), 2); // QR, AA, RD echoed; NXDOMAIN
    header.writeUInt16BE(1, 4);
    header.writeUInt16BE(addresses.length, 6);
    const answers = addresses.map((address) => {
      const rdata = qtype === 1 ? Buffer.from(address.split('.').map(Number)) : ipv6Bytes(address);
      const rr = Buffer.alloc(12);
      rr.writeUInt16BE(0xc00c, 0); // the name: a pointer to the question's
      rr.writeUInt16BE(qtype, 2);
      rr.writeUInt16BE(1, 4); // IN
      rr.writeUInt32BE(60, 6); // TTL
      rr.writeUInt16BE(rdata.length, 10);
      return Buffer.concat([rr, rdata]);
    });
    return Buffer.concat([header, msg.subarray(12, questionEnd), ...answers]);
  }
}

function ipv6Bytes(address: string): Buffer {
  const [head = '', tail = ''] = address.split('::');
  const groups = (s: string) => (s === '' ? [] : s.split(':'));
  const h = groups(head);
  const t = address.includes('::') ? groups(tail) : [];
  const all = [...h, ...Array(8 - h.length - t.length).fill('0'), ...t];
  const out = Buffer.alloc(16);
  all.forEach((g, i) => out.writeUInt16BE(parseInt(g, 16), i * 2));
  return out;
}
