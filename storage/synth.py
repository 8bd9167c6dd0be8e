"""Synthetic DICOM exports from plain pixel arrays, for tests, benchmarks and demos.

:func:`synthetic_dicom` wraps a :class:`codec.io.GrayImage` (e.g. a NIH chest X-ray PNG) into
a valid single-frame Digital X-Ray DICOM with fresh UIDs and *fictitious* patient attributes,
so that tests can check those values never leak. UIDs are derived from ``seed`` (same seed,
same file), under the ``2.25.`` UUID root. :func:`write_export` lays out a PACS-like export
(patient / study / files, some without a ``.dcm`` extension, optionally some in the old
preamble-less ACR-NEMA form) at any fsspec URI. :func:`sample_export` builds the demo's
export from the sample files the project ships (``tests/data``).
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from codec.io import GrayImage, read_png
from storage.fsutil import StorageOptions, join, open_fs
from storage.uids import derived_uid

__all__ = [
    "DX_FOR_PRESENTATION",
    "Patient",
    "crops",
    "dicom_bytes",
    "sample_export",
    "synthetic_dicom",
    "write_export",
]

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


@dataclass(frozen=True)
class Patient:
    """Fictitious identifying values (tests assert they never leave the archive)."""

    name: str = "SYNTHETIC^PATIENT"
    patient_id: str = "SYN000001"
    birth_date: str = "19700101"


def _uid(seed: str, role: str) -> str:
    return derived_uid(f"radiarc-synthetic:{seed}", role)


def synthetic_dicom(
    image: GrayImage,
    seed: str,
    *,
    patient: Patient | None = None,
    study_seed: str | None = None,
    series_seed: str | None = None,
    modality: str = "DX",
    body_part: str = "CHEST",
    photometric: str = "MONOCHROME2",
) -> Dataset:
    """A DICOM dataset holding ``image``; instances sharing ``study_seed``/``series_seed``
    share their study/series UIDs."""
    patient = patient or Patient()
    pixels = np.ascontiguousarray(image.pixels)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = _uid(seed, "instance")
    ds.StudyInstanceUID = _uid(study_seed or seed, "study")
    ds.SeriesInstanceUID = _uid(series_seed or study_seed or seed, "series")
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = "Radiarc synthetic"
    ds.ReferringPhysicianName = ""
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = "O"
    ds.BodyPartExamined = body_part
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 8 * pixels.dtype.itemsize
    ds.BitsStored = image.bits_stored
    ds.HighBit = image.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<"), copy=False).tobytes()
    ds["PixelData"].VR = "OB" if pixels.dtype.itemsize == 1 else "OW"
    return ds


def dicom_bytes(dataset: Dataset, *, acr_nema: bool = False) -> bytes:
    """The dataset as a DICOM Part 10 file (explicit VR little endian), or with
    ``acr_nema=True`` as an old preamble-less implicit-VR stream with no file meta."""
    buffer = io.BytesIO()
    if acr_nema:
        dataset = Dataset(dataset)  # the same elements, without the file meta
        pydicom.dcmwrite(
            buffer, dataset, implicit_vr=True, little_endian=True, enforce_file_format=False
        )
        return buffer.getvalue()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta = meta
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


def crops(image: GrayImage, side: int, count: int, seed: int = 0) -> Iterator[GrayImage]:
    """``count`` random ``side`` x ``side`` crops of ``image`` (small, distinct images)."""
    rng = np.random.default_rng(seed)
    height, width = image.pixels.shape
    for _ in range(count):
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1))
        pixels = np.ascontiguousarray(image.pixels[top : top + side, left : left + side])
        yield GrayImage(pixels, image.bits_stored)


def write_export(
    uri: str,
    images: Sequence[GrayImage],
    *,
    count: int | None = None,
    per_study: int = 4,
    prefix: str = "synthetic",
    acr_nema_every: int = 0,
    storage_options: StorageOptions | None = None,
) -> list[str]:
    """Write ``count`` DICOM files (default one per image, cycling through ``images``) under
    ``uri`` as ``PATIENT/STUDY/IMAGE`` and return their paths.

    Every ``per_study`` files share a study and series; odd files have no extension; with
    ``acr_nema_every=n`` every n-th file is written without preamble or file meta.
    """
    fs, root = open_fs(uri, storage_options)
    total = len(images) if count is None else count
    paths = []
    for index in range(total):
        study = index // per_study
        patient = Patient(f"SYNTH^PATIENT{study:05d}", f"SYN{study:06d}", "19650412")
        dataset = synthetic_dicom(
            images[index % len(images)],
            f"{prefix}:{index}",
            patient=patient,
            study_seed=f"{prefix}:study:{study}",
        )
        dataset.InstanceNumber = index % per_study + 1
        acr = bool(acr_nema_every) and index % acr_nema_every == acr_nema_every - 1
        name = f"IM{index:06d}" + ("" if index % 2 else ".dcm")
        path = join(root, f"P{study // 8:04d}", f"S{study:05d}", name)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, dicom_bytes(dataset, acr_nema=acr))
        paths.append(path)
    return paths


def sample_export(
    data_dir: str | Path, uri: str, storage_options: StorageOptions | None = None
) -> list[str]:
    """A small PACS-like export of real X-rays at ``uri``: every ``*.png`` of ``data_dir``
    as a synthetic DICOM (fictitious patients, fresh UIDs, deterministic: the same files each
    time) and every ``*.dcm`` copied unchanged into ``real/``, plus a README that is not DICOM.
    Returns the paths written."""
    data = Path(data_dir)
    pngs = sorted(data.glob("*.png"))
    dicoms = sorted(data.glob("*.dcm"))
    if not pngs and not dicoms:
        raise FileNotFoundError(f"no *.png or *.dcm sample files in {data}")
    paths = (
        write_export(
            uri,
            [read_png(path) for path in pngs],
            prefix="radiarc-demo",
            storage_options=storage_options,
        )
        if pngs
        else []
    )
    fs, root = open_fs(uri, storage_options)
    for path in dicoms:
        target = join(root, "real", path.name)
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(target, path.read_bytes())
        paths.append(target)
    readme = join(root, "README.txt")
    fs.pipe_file(readme, b"Sample export built by radiarc demo; this file is not DICOM.\n")
    return [*paths, readme]
