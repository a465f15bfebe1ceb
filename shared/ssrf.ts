import { promises as dns, type LookupAddress } from 'node:dns';
import { BlockList, isIP } from 'node:net';
import type { FieldError } from './errors.js';

/**
 * Ranges a webhook must never reach (IANA IPv4/IPv6 special-purpose registries): the service's own host,
 * private networks, cloud metadata, and addresses that are not unicast on the public Internet.
 * BlockList matches IPv4 rules against IPv4-mapped IPv6 addresses too (::ffff:127.0.0.1 is 127.0.0.1).
 */
const FORBIDDEN_RANGES: readonly [string, number, 'ipv4' | 'ipv6'][] = [
  ['0.0.0.0', 8, 'ipv4'], // "this network"
  ['10.0.0.0', 8, 'ipv4'], // private
  ['100.64.0.0', 10, 'ipv4'], // carrier-grade NAT
  ['127.0.0.0', 8, 'ipv4'], // loopback
  ['169.254.0.0', 16, 'ipv4'], // link-local, cloud metadata (169.254.169.254)
  ['172.16.0.0', 12, 'ipv4'], // private
  ['192.0.0.0', 24, 'ipv4'], // IETF protocol assignments
  ['192.0.2.0', 24, 'ipv4'], // documentation (TEST-NET-1)
  ['192.88.99.0', 24, 'ipv4'], // 6to4 relay anycast
  ['192.168.0.0', 16, 'ipv4'], // private
  ['198.18.0.0', 15, 'ipv4'], // benchmarking
  ['198.51.100.0', 24, 'ipv4'], // documentation (TEST-NET-2)
  ['203.0.113.0', 24, 'ipv4'], // documentation (TEST-NET-3)
  ['224.0.0.0', 4, 'ipv4'], // multicast
  ['240.0.0.0', 4, 'ipv4'], // reserved, and 255.255.255.255 broadcast
  ['::', 96, 'ipv6'], // unspecified ::, loopback ::1, IPv4-compatible (deprecated)
  ['64:ff9b::', 96, 'ipv6'], // NAT64 well-known prefix
  ['64:ff9b:1::', 48, 'ipv6'], // NAT64 local-use
  ['100::', 64, 'ipv6'], // discard-only
  ['2001::', 23, 'ipv6'], // IETF protocol assignments (Teredo, benchmarking, ORCHID)
  ['2001:db8::', 32, 'ipv6'], // documentation
  ['2002::', 16, 'ipv6'], // 6to4 (embeds any IPv4 address)
  ['3fff::', 20, 'ipv6'], // documentation
  ['5f00::', 16, 'ipv6'], // segment routing SIDs
  ['fc00::', 7, 'ipv6'], // unique-local
  ['fe80::', 10, 'ipv6'], // link-local
  ['fec0::', 10, 'ipv6'], // site-local (deprecated)
  ['ff00::', 8, 'ipv6'], // multicast
];

const forbidden = new BlockList();
for (const [network, prefix, type] of FORBIDDEN_RANGES) forbidden.addSubnet(network, prefix, type);

/** Thrown when a webhook host resolves to an address it must not be sent to. */
export class ForbiddenAddressError extends Error {
  constructor(
    readonly host: string,
    readonly address: string,
  ) {
    super(`${host} resolves to ${address}, which webhooks may not reach`);
    this.name = 'ForbiddenAddressError';
  }
}

/** Parses WEBHOOK_ALLOW_CIDRS (`10.1.0.0/16,::1/128`; a bare address is a single host); throws on a bad entry. */
export function parseCidrs(list: string): BlockList {
  const allowed = new BlockList();
  for (const entry of list.split(',').map((e) => e.trim()).filter(Boolean)) {
    const [, network = '', bits] = /^([^/]+)(?:\/(\d{1,3}))?$/.exec(entry) ?? [];
    const family = isIP(network);
    const max = family === 4 ? 32 : 128;
    const prefix = bits === undefined ? max : Number(bits);
    if (family === 0 || prefix > max) throw new Error(`"${entry}" is not a CIDR (e.g. 10.0.0.0/8 or fd00::/8)`);
    allowed.addSubnet(network, prefix, family === 4 ? 'ipv4' : 'ipv6');
  }
  return allowed;
}

/** True when a webhook must not be sent to `ip`: a special-purpose address outside `allowCidrs`, or not an IP at all. */
export function isForbiddenAddress(ip: string, allowCidrs: BlockList): boolean {
  const address = ip.split('%')[0] ?? ''; // a zone id (fe80::1%eth0) would make BlockList miss the match
  const family = isIP(address);
  if (family === 0) return true;
  const type = family === 4 ? 'ipv4' : 'ipv6';
  return forbidden.check(address, type) && !allowCidrs.check(address, type);
}

/** At least one address: dns.lookup fails with ENOTFOUND rather than answer none. */
export type ResolvedAddresses = [LookupAddress, ...LookupAddress[]];

/** Every address of a host name (not bracketed). */
export type HostResolver = (host: string) => Promise<LookupAddress[]>;

/** The system's resolver (getaddrinfo: /etc/hosts, search domains), run on one of libuv's threads. */
export const systemLookup: HostResolver = (host) => dns.lookup(host, { all: true });

/**
 * Resolves names over DNS with c-ares (`dns.Resolver`), on the event loop: a DNS server that answers slowly, or
 * never, holds no libuv thread (getaddrinfo holds one of four, shared with file I/O, crypto and every other
 * lookup of the process), and a lookup gives up after `tries` tries of at least `timeoutMs` each (c-ares may
 * lengthen later tries). A and AAAA are asked together. IP literals are themselves; `localhost` and
 * `*.localhost` are loopback (RFC 6761). Neither /etc/hosts nor the search domains of resolv.conf are used.
 */
export function dnsResolver(opts: { servers?: string[]; timeoutMs?: number; tries?: number } = {}): HostResolver {
  const resolver = new dns.Resolver({ timeout: opts.timeoutMs ?? 3000, tries: opts.tries ?? 2 });
  if (opts.servers) resolver.setServers(opts.servers);
  return async (host) => {
    const family = isIP(host);
    if (family !== 0) return [{ address: host, family }];
    const name = host.toLowerCase().replace(/\.$/, '');
    if (name === 'localhost' || name.endsWith('.localhost')) {
      return [
        { address: '127.0.0.1', family: 4 },
        { address: '::1', family: 6 },
      ];
    }
    const [v4, v6] = await Promise.allSettled([resolver.resolve4(name), resolver.resolve6(name)]);
    const found = [
      ...(v4.status === 'fulfilled' ? v4.value.map((address) => ({ address, family: 4 })) : []),
      ...(v6.status === 'fulfilled' ? v6.value.map((address) => ({ address, family: 6 })) : []),
    ];
    if (found.length > 0) return found;
    const failed = [v4, v6].find((r): r is PromiseRejectedResult => r.status === 'rejected' && (r.reason as NodeJS.ErrnoException).code !== 'ENODATA');
    throw failed?.reason ?? Object.assign(new Error(`${host} has no address`), { code: 'ENOTFOUND' });
  };
}

/**
 * Resolves every A/AAAA address of `host` (an IP literal resolves to itself) and returns them only when
 * none is forbidden: one bad address refuses the host, so DNS answers cannot steer a delivery inside.
 */
export async function resolveAllowed(host: string, allowCidrs: BlockList, resolve: HostResolver = systemLookup): Promise<ResolvedAddresses> {
  const bare = host.startsWith('[') && host.endsWith(']') ? host.slice(1, -1) : host;
  const [first, ...rest] = await resolve(bare);
  if (!first) throw Object.assign(new Error(`${host} has no address`), { code: 'ENOTFOUND' });
  const bad = [first, ...rest].find((a) => isForbiddenAddress(a.address, allowCidrs));
  if (bad) throw new ForbiddenAddressError(host, bad.address);
  return [first, ...rest];
}

/** Intake's syntax check of a callback URL: https (http only when allowed), no user info. */
export function checkWebhookUrl(url: string, opts: { allowHttp: boolean; path?: string }): FieldError[] {
  const path = opts.path ?? 'callback_url';
  let parsed: URL;
  try {
    parsed = new URL(url); // http(s) URLs without a host do not parse
  } catch {
    return [{ path, message: 'Must be an absolute URL.' }];
  }
  const errors: FieldError[] = [];
  const schemeOk = parsed.protocol === 'https:' || (opts.allowHttp && parsed.protocol === 'http:');
  if (!schemeOk) errors.push({ path, message: opts.allowHttp ? 'Must be an http(s) URL.' : 'Must be an https URL.' });
  if (parsed.username !== '' || parsed.password !== '') errors.push({ path, message: 'Must not contain a user name or password.' });
  return errors;
}
