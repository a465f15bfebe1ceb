/**
 * Which KMS connection endpoints keyferry may send requests to (KMS_ENDPOINT_HOSTS, ALLOW_HTTP_KMS_ENDPOINT).
 * Whoever sets a connection's endpoint chooses the wrapping public key that GetParametersForImport returns,
 * and so who can unwrap the key material keyferry sends: only AWS KMS's own hosts are allowed unless the
 * operator lists others.
 */

import { REGION_RE } from './schemas/upload-key.js';

/**
 * AWS KMS's own endpoints: regional and FIPS, in the commercial and China partitions, dual-stack (`api.aws`),
 * and VPC interface endpoints (`vpce-….kms.<region>.vpce.amazonaws.com`), each on https's port only. Not
 * `*.amazonaws.com`: anyone can serve an API under `execute-api.<region>.amazonaws.com` (API Gateway), and
 * S3 bucket names make hosts such as `kms.s3.amazonaws.com`.
 */
export const AWS_KMS_ENDPOINT_HOSTS = [
  'kms.<region>.amazonaws.com',
  'kms-fips.<region>.amazonaws.com',
  'kms.<region>.amazonaws.com.cn',
  'kms.<region>.api.aws',
  'kms-fips.<region>.api.aws',
  '*.kms.<region>.vpce.amazonaws.com',
] as const;

/**
 * A host pattern: `*` alone (any host, any port), or dot-separated labels, each a DNS label, `*` (exactly one
 * label) or `<region>` (one label shaped like an AWS region: `us-east-1`, `us-gov-west-1`), then optionally
 * `:PORT` or `:*`. Without a port, only the scheme's own port is allowed (443 for https).
 */
export const HOST_PATTERN_RE = /^(\*|(\*|<region>|[a-z0-9-]+)(\.(\*|<region>|[a-z0-9-]+))*(:(\*|\d{1,5}))?)$/;

const LABEL_RE = /^[a-z0-9-]+$/;

/** A KMS_ENDPOINT_HOSTS entry: HOST_PATTERN_RE, with at most one `<region>` label (a host serves one region). */
export function validHostPattern(pattern: string): boolean {
  return HOST_PATTERN_RE.test(pattern) && pattern.split('<region>').length <= 2;
}

/** KMS_ENDPOINT_HOSTS and ALLOW_HTTP_KMS_ENDPOINT. */
export interface KmsEndpointPolicy {
  hosts: readonly string[];
  allowHttp: boolean;
}

export function kmsEndpointPolicy(config: { KMS_ENDPOINT_HOSTS: readonly string[]; ALLOW_HTTP_KMS_ENDPOINT: boolean }): KmsEndpointPolicy {
  return { hosts: config.KMS_ENDPOINT_HOSTS, allowHttp: config.ALLOW_HTTP_KMS_ENDPOINT };
}

/**
 * Why `endpoint` (a URL) may not be used for requests signed for `regions`, or undefined if it may: http unless
 * `allowHttp`, or a host and port that no pattern in `hosts` matches (case-insensitive; the host as the AWS SDK
 * will connect to it, from the same URL parser). A host that only patterns with a `<region>` label match serves
 * that region alone: AWS refuses a request signed for another region (a signature's scope names its region),
 * so any other region in `regions` is refused here, before any request.
 */
export function kmsEndpointProblem(endpoint: string, policy: KmsEndpointPolicy, regions: readonly string[]): string | undefined {
  let url: URL;
  try {
    url = new URL(endpoint);
  } catch {
    return 'Not a URL.';
  }
  if (url.protocol === 'http:' && !policy.allowHttp) return 'Must be https (set ALLOW_HTTP_KMS_ENDPOINT=true for an emulator).';
  if (url.protocol !== 'https:' && url.protocol !== 'http:') return 'Must be https.';
  if (url.username || url.password) return 'Must not carry credentials.';
  const served = policy.hosts.map((p) => (p === '*' ? { region: undefined } : matches(url, p))).filter((m) => m !== undefined);
  if (served.length === 0) return "Not one of AWS KMS's endpoints, nor a host and port the operator allows (KMS_ENDPOINT_HOSTS).";
  if (served.some((m) => m.region === undefined || regions.every((r) => r === m.region))) return undefined;
  const region = served[0]?.region as string;
  const others = [...new Set(regions.filter((r) => r !== region))];
  return `A regional endpoint of ${region}: it cannot serve ${others.join(', ')} (AWS refuses requests signed for another region).`;
}

/** Whether `url`'s host and port match `pattern`; if so, the label its `<region>` matched, if it has one. */
function matches(url: URL, pattern: string): { region: string | undefined } | undefined {
  const [hostPattern = '', portPattern] = pattern.toLowerCase().split(':');
  // URL leaves `port` empty for the scheme's own port.
  const port = url.port || (url.protocol === 'https:' ? '443' : '80');
  const portOk = portPattern === undefined ? url.port === '' : portPattern === '*' || portPattern === port;
  if (!portOk) return undefined;
  const labels = url.hostname.toLowerCase().split('.');
  const wanted = hostPattern.split('.');
  if (labels.length !== wanted.length) return undefined;
  let region: string | undefined;
  for (const [i, w] of wanted.entries()) {
    const label = labels[i] as string;
    if (w === '*' ? !LABEL_RE.test(label) : w === '<region>' ? !REGION_RE.test(label) : w !== label) return undefined;
    if (w === '<region>') region = label;
  }
  return { region };
}
