"""Secrets the control plane must use again later (a webhook's HMAC key) kept encrypted in the database.

Sealed with libsodium's secretbox (XSalsa20-Poly1305, through PyNaCl, already a dependency for the OTA signatures) under
a key derived from the server's signing key (secrets.json, never in the database): a copy of the database alone — a
backup, a replica, a leaked dump — does not give the receivers' keys away. Every process of one control plane shares
secrets.json (it must already, or tokens would not verify across processes), so each can open what another sealed.

Stored form: `sb1:` + base64url(nonce ‖ ciphertext ‖ MAC). A value without the prefix is a secret written in plaintext
by a server from before sealing; `reseal` seals those at startup.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import hmac

import nacl.exceptions
import nacl.secret
import nacl.utils

PREFIX = "sb1:"
#: the derivation's context: a key for this use only, unrelated to the token signatures made with the signing key
_CONTEXT = b"picoiot/alert-receiver-secret/v1"


class Unreadable(Exception):
    """A sealed value this server cannot open (the signing key changed since it was sealed, or the row was altered)."""


class Sealer:
    def __init__(self, signing_key: str):
        self._box = nacl.secret.SecretBox(hmac.new(signing_key.encode(), _CONTEXT, hashlib.sha256).digest())

    def seal(self, plaintext: str) -> str:
        return PREFIX + base64.urlsafe_b64encode(bytes(self._box.encrypt(plaintext.encode()))).decode()

    def open(self, stored: str) -> str:
        if not is_sealed(stored):
            return stored  # written before sealing; `reseal` replaces it at the next start
        try:
            return self._box.decrypt(base64.urlsafe_b64decode(stored[len(PREFIX):])).decode()
        except (nacl.exceptions.CryptoError, ValueError) as e:
            raise Unreadable("cannot open the stored secret (was the server's signing key changed?)") from e


def is_sealed(stored: str) -> bool:
    return stored.startswith(PREFIX)


@functools.lru_cache(maxsize=4)
def for_key(signing_key: str) -> Sealer:
    """The Sealer of a signing key (one derivation per key, not one per notification)."""
    return Sealer(signing_key)
