"""DICOM UIDs: validated before they become archive path components, and derived for exports.

A UID from a source file ends up as a directory name in the archive (study/series/instance),
so a hostile value such as ``..``, ``a/b`` or a 10,000-character string must never get that
far. :func:`validate_uid` applies the grammar of DICOM PS3.5 section 9.1: 1 to 64 characters,
components of digits separated by single dots, no component with a leading zero (``0`` itself
is fine). Anything else raises :class:`UIDError`.

Real archives hold a few legacy UIDs that break only the leading-zero rule (one of our test
files has ``999.999.01.23...``). ``lenient=True`` accepts those and nothing else: digits and
dots, no empty component, at most 64 characters, which keeps them safe as path components.

:func:`derived_uid` gives the new SOP Instance UID of an exported, lossy-compressed image: the
same original, model and codec settings always give the same UID (a re-export does not create
a second instance), different settings give a different one.
"""

from __future__ import annotations

import hashlib
import re
import uuid

__all__ = ["UIDError", "derived_uid", "validate_uid"]

MAX_LENGTH = 64
_LENIENT = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_STRICT_COMPONENT = re.compile(r"0|[1-9][0-9]*")
# A fixed namespace for UUID-derived UIDs (uuid5 of a DNS-like name of ours).
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:radiarc:derived-sop-instance-uid")


class UIDError(ValueError):
    """A value that is not a DICOM UID (or not one Radiarc will use as a path component)."""


def validate_uid(value: object, what: str = "UID", *, lenient: bool = False) -> str:
    """``value`` as a string if it is a valid DICOM UID; otherwise :class:`UIDError`.

    ``what`` names the attribute in the message (e.g. "StudyInstanceUID"). The message quotes
    the value only when it is short and made of safe characters, so a hostile value cannot
    inject text into logs.
    """
    text = str(value).strip("\x00 ") if value is not None else ""
    if not text:
        raise UIDError(f"{what} is missing or empty")
    if len(text) > MAX_LENGTH:
        raise UIDError(f"{what} is {len(text)} characters long (a UID has at most {MAX_LENGTH})")
    if not _LENIENT.fullmatch(text):
        raise UIDError(f"{what} {_shown(text)} is not a DICOM UID (digits and single dots only)")
    if not lenient:
        for component in text.split("."):
            if not _STRICT_COMPONENT.fullmatch(component):
                raise UIDError(
                    f"{what} {text!r} is not a DICOM UID (component {component!r} has a "
                    "leading zero)"
                )
    return text


def _shown(text: str) -> str:
    if len(text) <= MAX_LENGTH and re.fullmatch(r"[0-9A-Za-z._-]*", text):
        return repr(text)
    return "(value not shown)"


def derived_uid(original: str, *parts: str, prefix: str | None = None) -> str:
    """A new UID determined by ``original`` and ``parts`` (model id, weights, codec settings).

    Without ``prefix`` it is a ``2.25.`` UID (ISO/IEC 9834-8: a UUID written as an integer),
    which needs no registered root; with an organisation's root ``prefix`` (ending in a dot)
    it is the prefix followed by digits of a SHA-256 of the same inputs, cut to 64 characters.
    """
    name = "\x1f".join([original, *parts])
    if prefix is None:
        return f"2.25.{uuid.uuid5(_NAMESPACE, name).int}"
    if not prefix.endswith(".") or len(prefix) > MAX_LENGTH - 10:
        raise UIDError(f"UID prefix {prefix!r} must end with '.' and leave room for 10 digits")
    validate_uid(prefix[:-1], "UID prefix")
    digits = str(int.from_bytes(hashlib.sha256(name.encode()).digest(), "big"))
    return validate_uid(f"{prefix}{digits.lstrip('0') or '0'}"[:MAX_LENGTH], "derived UID")
