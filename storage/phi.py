"""Keeping patient identity out of manifests, logs and reports.

Radiarc's rule (docs/storage.md): the archive itself keeps the full DICOM header, because an
export must rebuild a valid DICOM with the patient's identity in it; the archive is therefore
as sensitive as the PACS it came from. Everything *about* the archive (Parquet manifests, log
lines, audit reports) holds no patient names, IDs or birth dates. Manifests link images of the
same patient through :func:`patient_key`, an HMAC-SHA256 keyed with a secret that only the
archive operator holds: without the secret the key cannot be reversed or recomputed from a
guessed ID (a plain hash of an ID could be, by trying every plausible ID).

:func:`redact` removes the patient values of a header from any text that is about to leave
the archive, such as a source URI (some PACS exports name folders after patients) or an
exception message.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote

import pydicom
import pydicom.config
from pydicom.dataset import Dataset

__all__ = [
    "PHI_KEYWORDS",
    "REDACTED",
    "patient_key",
    "phi_values",
    "quiet_pydicom",
    "redact",
]

#: Header attributes whose values must never appear outside the archive.
PHI_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
)
REDACTED = "<redacted>"
#: Shorter name components are not redacted: they would mangle ordinary text ("CR", "1").
MIN_REDACTED_LENGTH = 3


def patient_key(secret: bytes | None, patient_id: str | None) -> str | None:
    """HMAC-SHA256 of the Patient ID under ``secret``, as hex; None without either."""
    if not secret or not patient_id or not patient_id.strip():
        return None
    return hmac.new(secret, patient_id.strip().encode("utf-8"), hashlib.sha256).hexdigest()


def phi_values(header: Dataset) -> list[str]:
    """The patient attributes' values, whole and by name component, longest first.

    Values are read raw, so pydicom neither validates nor logs them.
    """
    values: set[str] = set()
    for keyword in PHI_KEYWORDS:
        tag = pydicom.datadict.tag_for_keyword(keyword)
        if tag is None or tag not in header:
            continue
        try:
            raw = header.get_item(tag).value
        except Exception:
            continue
        if isinstance(raw, bytes):
            text = raw.decode("latin-1")
        elif isinstance(raw, list | tuple):
            text = "\\".join(str(item) for item in raw)
        else:
            text = str(raw) if raw is not None else ""
        for part in [text, *text.split("\\"), *text.replace("\\", "^").split("^")]:
            part = part.strip(" \x00")
            if len(part) >= MIN_REDACTED_LENGTH:
                values.add(part)
    return sorted(values, key=len, reverse=True)


def redact(text: str, header: Dataset | None) -> str:
    """``text`` with every patient value of ``header`` replaced by ``<redacted>``.

    Matching ignores case, and also catches the values percent-encoded (as in URIs).
    """
    if header is None or not text:
        return text
    for value in phi_values(header):
        for form in {value, quote(value, safe=""), quote(value)}:
            text = _replace_ignoring_case(text, form, REDACTED)
    return text


def _replace_ignoring_case(text: str, old: str, new: str) -> str:
    lowered, target = text.lower(), old.lower()
    start = lowered.find(target)
    while start >= 0:
        text = text[:start] + new + text[start + len(old) :]
        lowered = text.lower()
        start = lowered.find(target, start + len(new))
    return text


@contextmanager
def quiet_pydicom() -> Iterator[None]:
    """pydicom's value validation off while a header is converted or written: its warnings
    (also sent to the ``pydicom`` logger) quote the offending value, which may be a patient's
    birth date or name. The header is copied as it came; validating it is not our job."""
    settings = pydicom.config.settings
    saved = (settings.reading_validation_mode, settings.writing_validation_mode)
    settings.reading_validation_mode = pydicom.config.IGNORE
    settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        yield
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = saved
