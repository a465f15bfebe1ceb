/**
 * Which hosts a KMS connection's `endpoint` may name (KMS_ENDPOINT_HOSTS). Whoever sets a connection's endpoint
 * chooses the wrapping public key that GetParametersForImport returns, and so who can unwrap the key material
 * keyferry sends: only AWS KMS's own hosts are allowed unless the operator lists others.
 */

/**
 * AWS KMS's own endpoints: regional and FIPS, in the commercial and China partitions, dual-stack (`api.aws`),
 * and VPC interface endpoints (`vpce-….kms.<region>.vpce.amazonaws.com`). Not `*.amazonaws.com`: anyone can
 * serve an API under `execute-api.<region>.amazonaws.com` (API Gateway), and under `*.on.aws` (Lambda URLs).
 */
export const AWS_KMS_ENDPOINT_HOSTS = [
  'kms.*.amazonaws.com',
  'kms-fips.*.amazonaws.com',
  'kms.*.amazonaws.com.cn',
  'kms.*.api.aws',
  'kms-fips.*.api.aws',
  '*.kms.*.vpce.amazonaws.com',
] as const;

/** A host pattern: `*` alone (any host), or dot-separated labels, each a DNS label or `*` (exactly one label). */
export const HOST_PATTERN_RE = /^(\*|(\*|[a-z0-9-]+)(\.(\*|[a-z0-9-]+))*)$/;

/** Whether `endpoint` (a URL) names a host that one of `patterns` matches (case-insensitive). */
export function kmsEndpointAllowed(endpoint: string, patterns: readonly string[]): boolean {
  let host: string;
  try {
    host = new URL(endpoint).hostname.toLowerCase();
  } catch {
    return false;
  }
  return patterns.some((p) => p === '*' || hostMatches(host, p));
}

function hostMatches(host: string, pattern: string): boolean {
  const labels = host.split('.');
  const wanted = pattern.toLowerCase().split('.');
  return labels.length === wanted.length && wanted.every((w, i) => (w === '*' ? /^[a-z0-9-]+$/.test(labels[i] as string) : w === labels[i]));
}
