"""Device secrets are stored only as salted PBKDF2 hashes."""

from __future__ import annotations

import pytest

from domain.credentials import ALGORITHM, hash_secret, verify_secret

SALT = bytes(range(16))
OTHER_SALT = bytes(range(1, 17))
SECRET = "s3cr3t-0123456789abcdef"


def test_hashed_secret_verifies_against_the_same_secret() -> None:
    encoded = hash_secret(SECRET, SALT)

    assert verify_secret(SECRET, encoded) is True


def test_hash_has_algorithm_iterations_salt_and_digest_and_not_the_secret() -> None:
    encoded = hash_secret(SECRET, SALT, iterations=5)

    algorithm, iterations, salt, digest = encoded.split("$")
    assert algorithm == ALGORITHM
    assert iterations == "5"
    assert salt
    assert digest
    assert SECRET not in encoded
    assert verify_secret(SECRET, encoded) is True


def test_hash_of_a_secret_and_salt_is_deterministic() -> None:
    assert hash_secret(SECRET, SALT) == hash_secret(SECRET, SALT)


@pytest.mark.parametrize("wrong", ["", "s3cr3t-0123456789abcdeF", SECRET + " ", SECRET[:-1]])
def test_wrong_secret_does_not_verify(wrong: str) -> None:
    assert verify_secret(wrong, hash_secret(SECRET, SALT)) is False


def test_distinct_salts_give_distinct_hashes_that_both_verify() -> None:
    first = hash_secret(SECRET, SALT)
    second = hash_secret(SECRET, OTHER_SALT)

    assert first != second
    assert verify_secret(SECRET, first) is True
    assert verify_secret(SECRET, second) is True


def test_non_ascii_secret_roundtrips() -> None:
    assert verify_secret("clé-🔑-secret", hash_secret("clé-🔑-secret", SALT)) is True


@pytest.mark.parametrize("salt", [b"", b"short", bytes(15)])
def test_salt_shorter_than_16_bytes_is_refused(salt: bytes) -> None:
    with pytest.raises(ValueError, match="salt"):
        hash_secret(SECRET, salt)


def test_hash_of_another_algorithm_does_not_verify() -> None:
    encoded = hash_secret(SECRET, SALT).replace(ALGORITHM, "md5", 1)

    assert verify_secret(SECRET, encoded) is False


@pytest.mark.parametrize(
    "encoded",
    [
        "",
        "garbage",
        "pbkdf2_sha256",
        "pbkdf2_sha256$1000$salt",
        "pbkdf2_sha256$1000$a$b$c",
        "pbkdf2_sha256$many$AAAAAAAAAAAAAAAAAAAAAA==$digest",
        "pbkdf2_sha256$$AAAAAAAAAAAAAAAAAAAAAA==$digest",
        "pbkdf2_sha256$0$AAAAAAAAAAAAAAAAAAAAAA==$digest",
        "pbkdf2_sha256$-1$AAAAAAAAAAAAAAAAAAAAAA==$digest",
        "pbkdf2_sha256$1000$A$digest",
        "pbkdf2_sha256$1000$!!!$digest",
    ],
)
def test_malformed_encoded_hash_does_not_verify_and_does_not_raise(encoded: str) -> None:
    assert verify_secret(SECRET, encoded) is False
