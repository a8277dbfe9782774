"""Device secrets are kept only as salted PBKDF2 hashes; generating the secret is the caller's.

Secrets are 256-bit random values, so brute force is not the threat a high iteration count
defends against; a modest count keeps registration cheap on a Raspberry Pi.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

ALGORITHM = "pbkdf2_sha256"
ITERATIONS = 1_000
MAX_ITERATIONS = 1_000_000


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def hash_secret(secret: str, salt: bytes, iterations: int = ITERATIONS) -> str:
    """Return `pbkdf2_sha256$iterations$salt$hash` for the secret."""
    if len(salt) < 16:
        raise ValueError("salt must be at least 16 bytes")
    digest = hashlib.pbkdf2_hmac("sha256", secret.encode(), salt, iterations)
    return f"{ALGORITHM}${iterations}${_b64(salt)}${_b64(digest)}"


def verify_secret(secret: str, encoded: str) -> bool:
    try:
        algorithm, iterations, salt, expected = encoded.split("$")
        rounds = int(iterations)
        raw_salt = base64.b64decode(salt, validate=True)
    except (ValueError, binascii.Error):
        return False
    if algorithm != ALGORITHM or not 1 <= rounds <= MAX_ITERATIONS:
        return False
    digest = hashlib.pbkdf2_hmac("sha256", secret.encode(), raw_salt, rounds)
    return hmac.compare_digest(_b64(digest), expected)
