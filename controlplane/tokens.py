"""Bearer secrets: provisioning tokens (vtk_), node tokens (vnt_) and API keys (vlk_).

They are 256-bit random strings, so one SHA-256 is a safe way to store them: there is nothing to
brute-force that a slow password hash would protect. Only the hash ever reaches the database.
"""

from __future__ import annotations

import hashlib
import secrets

PROVISIONING_PREFIX = "vtk_"
NODE_TOKEN_PREFIX = "vnt_"
API_KEY_PREFIX = "vlk_"


def new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    # surrogatepass: a string from JSON may hold lone surrogates; it hashes (and matches nothing)
    # instead of failing to encode.
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(8)
