"""Fail points: faults injected on purpose at named places of the encoder, for the reliability
tests and ``python -m flows.chaos`` (the technique of FoundationDB's and TiKV's fail points).

A fail point is armed for particular source files (by their checksum, ``sha256:...`` or
``etag:...``) through the ``RADIARC_FAILPOINTS`` environment variable of the driver, as JSON::

    RADIARC_FAILPOINTS='{"encode": {"sha256:3f2a...": "raise"}}'

Actions: ``raise`` (an exception, as a bug in the codec would raise) and ``crash`` (the
worker process exits at once, as a segfault in a native decoder would end it). The driver
reads the variable once per run and ships the points to the encoders inside their job, so
nothing depends on Ray propagating environment variables. Unset, every check is a dictionary
lookup that finds nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["ENV", "FailPoints", "InjectedFault"]

ENV = "RADIARC_FAILPOINTS"
NAMES = ("encode",)
ACTIONS = ("raise", "crash")


class InjectedFault(RuntimeError):
    """The exception a ``raise`` fail point throws."""


@dataclass(frozen=True)
class FailPoints:
    """Armed fail points: ``{name: {source checksum: action}}``."""

    armed: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, keys in self.armed.items():
            if name not in NAMES:
                raise ValueError(f"{ENV}: unknown fail point {name!r} (known: {NAMES})")
            for action in keys.values():
                if action not in ACTIONS:
                    raise ValueError(f"{ENV}: unknown action {action!r} (known: {ACTIONS})")

    @classmethod
    def from_env(cls) -> FailPoints:
        text = os.environ.get(ENV, "").strip()
        if not text:
            return cls()
        try:
            armed = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{ENV} is not valid JSON: {error}") from error
        if not isinstance(armed, dict) or not all(isinstance(v, dict) for v in armed.values()):
            raise ValueError(f'{ENV} must look like {{"encode": {{"sha256:...": "raise"}}}}')
        return cls(armed)

    def check(self, name: str, key: str | None) -> None:
        """Fire the fail point ``name`` if it is armed for ``key``."""
        action = self.armed.get(name, {}).get(key or "")
        if action == "raise":
            raise InjectedFault(f"fail point {name!r} fired")
        if action == "crash":
            os._exit(86)  # no cleanup, no exception: the process is simply gone
