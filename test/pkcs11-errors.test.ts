import { describe, expect, it } from 'vitest';
import { isPinFailure, isSessionLost } from '../worker/sources/pkcs11-errors.js';

/** A failure as pkcs11js throws it: its message is the CKR_ name. */
const ckr = (name: string) => Object.assign(new Error(name), { name: 'Pkcs11Error', code: 0 });

describe('PKCS#11 failures', () => {
  it('when the slot the pool found for its token no longer exists (CKR_SLOT_ID_INVALID), then the session counts as lost: the pool looks for the token again and retries', () => {
    expect(isSessionLost(ckr('CKR_SLOT_ID_INVALID'))).toBe(true);
    expect(isSessionLost(ckr('CKR_SESSION_HANDLE_INVALID'))).toBe(true);
  });

  it('when the PIN is refused, then it is a PIN failure and no lost session (no second login with it)', () => {
    expect(isPinFailure(ckr('CKR_PIN_INCORRECT'))).toBe(true);
    expect(isSessionLost(ckr('CKR_PIN_INCORRECT'))).toBe(false);
    expect(isSessionLost(new Error('CKR_SLOT_ID_INVALID'))).toBe(false);
  });
});
