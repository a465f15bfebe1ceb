import { pbkdf2 } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ForbiddenAddressError, checkWebhookUrl, dnsResolver, isForbiddenAddress, parseCidrs, resolveAllowed, type HostResolver } from '../shared/ssrf.js';
import { TestDnsServer } from './helpers/dns-server.js';

const none = parseCidrs('');

describe('isForbiddenAddress', () => {
  it.each([
    ['127.0.0.1', 'loopback'],
    ['127.255.255.254', 'loopback'],
    ['10.1.2.3', 'RFC 1918'],
    ['172.16.0.1', 'RFC 1918'],
    ['172.31.255.255', 'RFC 1918'],
    ['192.168.1.1', 'RFC 1918'],
    ['169.254.169.254', 'cloud metadata'],
    ['169.254.0.1', 'link-local'],
    ['100.64.0.1', 'CGNAT'],
    ['100.127.255.255', 'CGNAT'],
    ['0.0.0.0', 'this network'],
    ['0.1.2.3', 'this network'],
    ['224.0.0.1', 'multicast'],
    ['239.255.255.250', 'multicast'],
    ['240.0.0.1', 'reserved'],
    ['255.255.255.255', 'broadcast'],
    ['192.0.2.10', 'documentation'],
    ['198.51.100.10', 'documentation'],
    ['203.0.113.10', 'documentation'],
    ['198.18.0.1', 'benchmarking'],
    ['192.0.0.8', 'IETF protocol assignments'],
    ['::1', 'IPv6 loopback'],
    ['::', 'IPv6 unspecified'],
    ['fc00::1', 'unique-local'],
    ['fd12:3456::1', 'unique-local'],
    ['fe80::1', 'link-local'],
    ['fe80::1%eth0', 'link-local with a zone id'],
    ['ff02::1', 'multicast'],
    ['::ffff:127.0.0.1', 'IPv4-mapped loopback'],
    ['::ffff:a9fe:a9fe', 'IPv4-mapped metadata, hex form'],
    ['::ffff:10.0.0.1', 'IPv4-mapped private'],
    ['64:ff9b::7f00:1', 'NAT64'],
    ['64:ff9b::808:808', 'NAT64 of a public address'],
    ['2001:db8::1', 'documentation'],
    ['2002:7f00:1::', '6to4'],
    ['2001::1', 'Teredo'],
    ['not-an-ip', 'not an address'],
  ])('when the address is %s (%s), then it is forbidden', (ip) => {
    expect(isForbiddenAddress(ip, none)).toBe(true);
  });

  it.each(['8.8.8.8', '1.1.1.1', '172.32.0.1', '100.128.0.1', '2606:4700:4700::1111', '::ffff:8.8.8.8'])(
    'when the address is public (%s), then it is allowed',
    (ip) => {
      expect(isForbiddenAddress(ip, none)).toBe(false);
    },
  );

  it('when a CIDR is allowed, then addresses inside it pass (IPv4-mapped forms too) and the rest stay forbidden', () => {
    const allow = parseCidrs('127.0.0.0/8, 10.1.0.0/16, fd00::/8, 192.168.5.5');
    expect(isForbiddenAddress('127.0.0.1', allow)).toBe(false);
    expect(isForbiddenAddress('::ffff:127.0.0.1', allow)).toBe(false);
    expect(isForbiddenAddress('10.1.200.3', allow)).toBe(false);
    expect(isForbiddenAddress('fd00::5', allow)).toBe(false);
    expect(isForbiddenAddress('192.168.5.5', allow)).toBe(false);
    expect(isForbiddenAddress('192.168.5.6', allow)).toBe(true);
    expect(isForbiddenAddress('10.2.0.1', allow)).toBe(true);
    expect(isForbiddenAddress('169.254.169.254', allow)).toBe(true);
    expect(isForbiddenAddress('::1', allow)).toBe(true);
  });
});

describe('parseCidrs', () => {
  it.each(['10.0.0.0/33', 'fd00::/129', 'example.com/8', '10.0.0.0/', '10.0.0.0/8/1', '10.0.0.0/x'])(
    'when an entry is not a CIDR (%s), then it throws naming it',
    (bad) => {
      expect(() => parseCidrs(bad)).toThrow(bad);
    },
  );
});

describe('resolveAllowed', () => {
  it('when a host name resolves to a loopback address, then it is refused unless its CIDR is allowed', async () => {
    await expect(resolveAllowed('localhost', none)).rejects.toBeInstanceOf(ForbiddenAddressError);
    const addresses = await resolveAllowed('localhost', parseCidrs('127.0.0.0/8,::1/128'));
    expect(addresses.map((a) => a.address)).toContain('127.0.0.1');
  });

  it('when the host is an IP literal (bracketed IPv6 too), then that address itself is checked', async () => {
    await expect(resolveAllowed('169.254.169.254', none)).rejects.toThrow(/169\.254\.169\.254/);
    await expect(resolveAllowed('[::1]', none)).rejects.toBeInstanceOf(ForbiddenAddressError);
    await expect(resolveAllowed('[::ffff:7f00:1]', none)).rejects.toBeInstanceOf(ForbiddenAddressError);
    expect(await resolveAllowed('[::1]', parseCidrs('::1/128'))).toEqual([{ address: '::1', family: 6 }]);
  });
});

describe('dnsResolver (callback hosts)', () => {
  const dns = new TestDnsServer(
    {
      'hooks.example': { a: ['8.8.4.4'], aaaa: ['2001:4860:4860::8844'] },
      'v6only.example': { aaaa: ['2001:4860:4860::8888'] },
      'inside.example': { a: ['8.8.8.8', '10.0.0.5'] },
    },
    new Set(['slow.example']),
  );
  let resolve: HostResolver;
  beforeAll(async () => {
    resolve = dnsResolver({ servers: [await dns.listen()], timeoutMs: 1000, tries: 1 });
  });
  afterAll(() => dns.close());

  it('when a name has A and AAAA records, then both kinds of address are returned and checked', async () => {
    expect(await resolveAllowed('hooks.example', none, resolve)).toEqual([
      { address: '8.8.4.4', family: 4 },
      { address: '2001:4860:4860::8844', family: 6 },
    ]);
    expect(await resolveAllowed('V6ONLY.example.', none, resolve)).toEqual([{ address: '2001:4860:4860::8888', family: 6 }]);
    await expect(resolveAllowed('inside.example', none, resolve)).rejects.toThrow(/10\.0\.0\.5/);
  });

  it('when a name does not exist, then it fails with ENOTFOUND', async () => {
    await expect(resolve('nowhere.example')).rejects.toMatchObject({ code: 'ENOTFOUND' });
  });

  it('when the host is localhost or an IP literal, then no DNS server is asked', async () => {
    const before = dns.asked.length;
    expect(await resolve('localhost')).toEqual([
      { address: '127.0.0.1', family: 4 },
      { address: '::1', family: 6 },
    ]);
    expect(await resolve('api.localhost')).toHaveLength(2);
    expect(await resolve('192.0.2.1')).toEqual([{ address: '192.0.2.1', family: 4 }]);
    expect(dns.asked.length).toBe(before);
  });

  it("when the DNS server never answers, then lookups time out and, while they wait, libuv's threads stay free", async () => {
    let settled = 0;
    const hanging = Array.from({ length: 8 }, () =>
      resolve('slow.example').then(
        () => settled++,
        (err: NodeJS.ErrnoException) => {
          settled++;
          return err.code;
        },
      ),
    );
    // Four tasks for libuv's four threads: with the lookups on those threads (getaddrinfo), they would wait.
    await Promise.all(Array.from({ length: 4 }, () => new Promise((done, fail) => pbkdf2('pw', 'salt', 1, 32, 'sha256', (err) => (err ? fail(err) : done(undefined))))));
    expect(settled).toBe(0);
    expect(await Promise.all(hanging)).toEqual(Array(8).fill('ETIMEOUT'));
  });
});

describe('checkWebhookUrl', () => {
  it('when the URL is https, then there is no error', () => {
    expect(checkWebhookUrl('https://hooks.example.com/keyferry?x=1', { allowHttp: false })).toEqual([]);
  });

  it('when the URL is http, then it is refused unless http is allowed', () => {
    expect(checkWebhookUrl('http://hooks.example.com/', { allowHttp: false })).toEqual([{ path: 'callback_url', message: 'Must be an https URL.' }]);
    expect(checkWebhookUrl('http://hooks.example.com/', { allowHttp: true })).toEqual([]);
  });

  it('when the URL has user info, another scheme or no host, then each problem is a field error', () => {
    expect(checkWebhookUrl('https://user:pw@hooks.example.com/', { allowHttp: false, path: 'items[0].callback_url' })).toEqual([
      { path: 'items[0].callback_url', message: 'Must not contain a user name or password.' },
    ]);
    expect(checkWebhookUrl('ftp://hooks.example.com/', { allowHttp: true })[0]?.message).toBe('Must be an http(s) URL.');
    expect(checkWebhookUrl('https://', { allowHttp: false })[0]?.message).toBe('Must be an absolute URL.');
    expect(checkWebhookUrl('/relative', { allowHttp: false })[0]?.message).toBe('Must be an absolute URL.');
  });
});
