import { describe, expect, it } from 'vitest';
import { classify, classifyAttempt, NEW_KEY_SETTLING_MS } from '../worker/classify.js';

/** An error as the AWS SDK throws it for a KMS error answer. */
const awsError = (name: string, status = 400) => Object.assign(new Error(`${name} from KMS`), { name, $metadata: { httpStatusCode: status } });

describe('classify', () => {
  it('when KMS throttles, fails inside, or the network drops, then the failure is retryable; when it denies or rejects, then it is not', () => {
    expect(classify(awsError('ThrottlingException'))).toMatchObject({ code: 'aws_unavailable', retryable: true });
    expect(classify(awsError('KMSInternalException', 500))).toMatchObject({ code: 'aws_unavailable', retryable: true });
    expect(classify(Object.assign(new Error('socket hang up'), { code: 'ECONNRESET' }))).toMatchObject({ code: 'aws_unreachable', retryable: true });
    expect(classify(awsError('AccessDeniedException'))).toMatchObject({ code: 'aws_access_denied', retryable: false });
    expect(classify(awsError('NotFoundException'))).toMatchObject({ code: 'aws_key_not_found', retryable: false });
    expect(classify(awsError('SomethingNew', 400))).toMatchObject({ code: 'aws_request_rejected', retryable: false });
    // What the SDK throws for a connection without keys on a worker with no AWS identity of its own.
    const noCredentials = Object.assign(new Error('Could not load credentials from any providers'), { name: 'CredentialsProviderError' });
    expect(classify(noCredentials)).toMatchObject({ code: 'aws_credentials_unavailable', retryable: true });
  });
});

describe('classifyAttempt: a key KMS may not know everywhere yet', () => {
  const madeAt = '2026-12-07T12:00:00.000Z';
  const at = (ms: number) => Date.parse(madeAt) + ms;

  it('when NotFoundException or KMSInvalidStateException comes within the settling time after CreateKey, then it is retried with its own code', () => {
    expect(classifyAttempt(awsError('NotFoundException'), madeAt, at(1500))).toMatchObject({ code: 'aws_key_not_found', retryable: true });
    expect(classifyAttempt(awsError('KMSInvalidStateException'), madeAt, at(NEW_KEY_SETTLING_MS - 1))).toMatchObject({ code: 'aws_invalid_key_state', retryable: true });
    expect(classifyAttempt(awsError('NotFoundException'), madeAt, at(1500)).message).toMatch(/made 2 s ago/);
    // A worker whose clock is a little behind the one that recorded the intent.
    expect(classifyAttempt(awsError('NotFoundException'), madeAt, at(-5000))).toMatchObject({ retryable: true });
  });

  it('when it comes later, or the job has no key, then it is permanent; other permanent errors stay permanent within the settling time', () => {
    expect(classifyAttempt(awsError('NotFoundException'), madeAt, at(NEW_KEY_SETTLING_MS))).toMatchObject({ code: 'aws_key_not_found', retryable: false });
    expect(classifyAttempt(awsError('NotFoundException'), undefined, at(1500))).toMatchObject({ retryable: false });
    expect(classifyAttempt(awsError('NotFoundException'), 'not a date', at(1500))).toMatchObject({ retryable: false });
    expect(classifyAttempt(awsError('NotFoundException'), madeAt, at(-60_000))).toMatchObject({ retryable: false });
    expect(classifyAttempt(awsError('AccessDeniedException'), madeAt, at(1500))).toMatchObject({ code: 'aws_access_denied', retryable: false });
  });
});
