"""Helpers shared by the storage tests: cheap codec settings, small images, PHI values."""

from __future__ import annotations

import copy
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom

from codec.io import GrayImage, read_png
from codec.rate import RateControl
from storage.archive import ArchiveSettings
from storage.dicom import DicomImage, read_dicom
from storage.synth import Patient, crops, dicom_bytes, synthetic_dicom

DATA = Path(__file__).parent / "data"
MONO1 = DATA / "CR-MONO1-10-chest.dcm"  # 440x440, preamble-less ACR-NEMA, 10 bits
RG3 = DATA / "RG3_J2KR.dcm"  # 1760x1760, JPEG 2000 lossless, already DERIVED
LUT = DATA / "CR-ModalitySequenceLUT.dcm"  # SOP Instance UID with a leading-zero component
REAL_DICOMS = (MONO1, RG3, LUT)
PNGS = sorted(DATA.glob("*.png"))

#: Two iterations on 64-pixel tiles: a 128x128 image codes in a fraction of a second.
CHEAP = ArchiveSettings(rate=RateControl(iterations=2), tile_size=64)

#: Fictitious patient of the synthetic files, its name also a folder of the export.
PATIENT = Patient(name="TESTPERSON^ALICE^MARIE", patient_id="PID-4711-XYZ", birth_date="19520317")


def phi_values(path: Path) -> list[str]:
    """Non-empty PatientName / PatientID / PatientBirthDate values (and name parts) of a file,
    read raw; parts shorter than 3 characters are ignored (they match ordinary text)."""
    dataset = pydicom.dcmread(path, force=True, stop_before_pixels=True)
    values: list[str] = []
    for tag in (0x00100010, 0x00100020, 0x00100030):
        if tag in dataset:
            raw = dataset.get_item(tag).value
            text = raw.decode("latin-1") if isinstance(raw, bytes) else str(raw or "")
            text = text.strip(" \x00")
            values += [part for part in [text, *text.split("^")] if len(part.strip()) >= 3]
    return values


def synthetic_phi() -> list[str]:
    name = PATIENT.name
    return [name, *name.split("^"), PATIENT.patient_id, PATIENT.birth_date]


def cropped(dicom: DicomImage, side: int = 128) -> DicomImage:
    """The top-left ``side`` x ``side`` of an image, its header kept (Rows/Columns updated):
    a real header at a codec cost of a few tiles."""
    top = max(0, (dicom.image.pixels.shape[0] - side) // 2)
    left = max(0, (dicom.image.pixels.shape[1] - side) // 2)
    pixels = np.ascontiguousarray(dicom.image.pixels[top : top + side, left : left + side])
    header = copy.deepcopy(dicom.header)
    header.Rows, header.Columns = pixels.shape
    return replace(dicom, image=GrayImage(pixels, dicom.image.bits_stored), header=header)


def small_pngs(count: int = 3, side: int = 96) -> list[GrayImage]:
    """Distinct ``side`` x ``side`` crops of the test PNGs (8-bit)."""
    images = [read_png(path) for path in PNGS[:2]]
    out: list[GrayImage] = []
    for index in range(count):
        out += list(crops(images[index % len(images)], side, 1, seed=index))
    return out


def write_local_export(root: Path, images: list[GrayImage] | None = None) -> dict[str, Path]:
    """A small PACS-like export: synthetic DICOMs (one preamble-less, one without extension)
    in a folder named after the fictitious patient, the real ACR-NEMA file, and things that
    are not DICOM (a PNG named .dcm, a text file, an empty file). Name -> path."""
    images = images or small_pngs(3)
    folder = root / PATIENT.name / "study1"
    folder.mkdir(parents=True)
    files: dict[str, Path] = {}
    for index, image in enumerate(images):
        dataset = synthetic_dicom(image, f"export:{index}", patient=PATIENT, study_seed="export")
        name = f"IMG{index}" + (".dcm" if index != 1 else "")
        path = folder / name
        path.write_bytes(dicom_bytes(dataset, acr_nema=index == 2))
        files[name] = path
    (root / "legacy").mkdir()
    files["mono1"] = Path(shutil.copy(MONO1, root / "legacy" / "chest"))
    (root / "notes.txt").write_text("not an image\n" * 20)
    (root / "fake.dcm").write_bytes(PNGS[0].read_bytes())
    (root / "legacy" / "empty.dcm").write_bytes(b"")
    return files


def decoded_real(path: Path) -> DicomImage:
    return read_dicom(path)
