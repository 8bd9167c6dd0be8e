"""Which fsspec storage options are credentials, so that they are never logged or stored.

Credentials reach Radiarc through the standard AWS chain (environment variables, shared
config and credentials files, an instance or pod role), which fsspec and botocore read
themselves, or through settings from the environment or a config file. Option keys that carry
a credential (``key``, ``secret``, ``token``, ``aws_secret_access_key`` inside
``client_kwargs``, ...) are found by :func:`credential_paths` and hidden by :func:`masked`
wherever options are shown; flows refuse them as Prefect flow parameters, which Prefect keeps
in its database.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["CREDENTIAL_KEYS", "MASK", "credential_paths", "masked"]

CREDENTIAL_KEYS = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "passwd",
        "session_token",
        "access_key",
        "secret_key",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "account_key",
        "sas_token",
        "client_secret",
        "credentials",
    }
)
MASK = "***"


def credential_paths(options: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of the credential entries in ``options``, nested mappings included."""
    found = []
    for name, value in options.items():
        path = f"{prefix}{name}"
        if str(name).lower() in CREDENTIAL_KEYS:
            found.append(path)
        elif isinstance(value, Mapping):
            found += credential_paths(value, f"{path}.")
    return found


def masked(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with every credential value replaced by :data:`MASK`."""
    return {
        name: MASK
        if str(name).lower() in CREDENTIAL_KEYS
        else masked(value)
        if isinstance(value, Mapping)
        else value
        for name, value in options.items()
    }
