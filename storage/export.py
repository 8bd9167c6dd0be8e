"""Export an archived instance back to a valid DICOM file.

The output has the original header (from the array's ``dicom`` attribute), the decoded pixels
uncompressed in Explicit VR Little Endian, and what PS3.3 C.7.6.1.1.5 asks of a lossy
compressed image:

- Lossy Image Compression (0028,2110) = ``01``; Lossy Image Compression Ratio (0028,2112)
  and Method (0028,2114) gain one value each (earlier values of a source that was already
  lossy compressed are kept, in order). The method is :data:`METHOD`: the standard's defined
  terms name only ISO codecs, and CS defined terms may be extended.
- Image Type (0008,0008) value 1 = ``DERIVED`` and a new SOP Instance UID, derived
  deterministically from the original UID, the model, its weights and the codec settings
  (:func:`storage.uids.derived_uid`): exporting twice gives the same UID.
- The derivation recorded: Derivation Description (0008,2111) with the ratio and the measured
  quality, Derivation Code Sequence (0008,9215) with (113040, DCM, "Lossy Compression"), and
  Source Image Sequence (0008,2112) referencing the original SOP Instance with purpose
  (121320, DCM, "Uncompressed predecessor"), or 121330 "Lossy compressed predecessor" when
  the source already was.

Study and series UIDs stay those of the original (the export belongs with it). An instance
archived losslessly (``radiarc migrate --max-error 0``; its recorded max abs error is 0) is
exported as the original instance: same SOP Instance UID, nothing marked lossy or derived.

Before anything is written, the array's chunk objects are read once and hashed: if they no
longer match the SHA-256 recorded when the instance was archived (``radiarc.stored``), the
export is refused with :class:`ExportError` and no file is written; the pixels exported are
decoded from exactly the bytes that were checked. Arrays archived before checksums were
recorded are exported with a logged warning that there was nothing to verify.
"""

from __future__ import annotations

import io
import json
import logging
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from storage.chunks import CHUNKS_DIGEST, array_from_objects, chunk_objects, chunks_sha256
from storage.fsutil import StorageOptions, join, open_fs, write_atomic
from storage.layout import Archive
from storage.phi import quiet_pydicom
from storage.uids import derived_uid

__all__ = ["METHOD", "ExportError", "export_dataset", "export_dicom", "verified_instance"]

#: Lossy Image Compression Method (0028,2114) written for Radiarc (CS, at most 16 characters).
METHOD = "RADIARC_RNNCONV"
IMPLEMENTATION_VERSION = "RADIARC_0_1"
_DESCRIPTION_MAX = 1024  # ST
log = logging.getLogger(__name__)


class ExportError(ValueError):
    """An instance that cannot be exported (missing, incomplete, or not a Radiarc array)."""


def export_dicom(
    archive_uri: str,
    uid_or_path: str,
    out_uri: str,
    *,
    storage_options: StorageOptions | None = None,
    out_storage_options: StorageOptions | None = None,
    uid_prefix: str | None = None,
) -> Dataset:
    """Write the instance ``uid_or_path`` of the archive as a DICOM file at ``out_uri``.

    Returns the dataset written. ``uid_prefix`` (an organisation root ending in '.') replaces
    the default ``2.25.`` form of the new SOP Instance UID.
    """
    archive = Archive(archive_uri, storage_options, create=False)
    try:
        path = archive.locate(uid_or_path)
    except (KeyError, ValueError) as error:
        raise ExportError(str(error).strip("'\"")) from error
    attributes, pixels = verified_instance(archive, path)
    buffer = io.BytesIO()
    with quiet_pydicom():
        dataset = export_dataset(attributes, pixels, uid_prefix=uid_prefix)
        pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    fs, out_path = open_fs(out_uri, out_storage_options)
    write_atomic(fs, out_path, buffer.getvalue())
    return dataset


def verified_instance(archive: Archive, path: str) -> tuple[dict[str, Any], np.ndarray]:
    """The attributes and decoded pixels of the complete instance array at ``path``, after
    checking its chunk objects against the SHA-256 recorded at archive time; ExportError
    (naming the instance by SOP Instance UID only) when they differ."""
    sop = path.rstrip("/").rsplit("/", 1)[-1]
    array_path = join(archive.root, path)
    metadata_json = archive.fs.cat_file(join(array_path, "zarr.json"))
    try:
        metadata = json.loads(metadata_json)
    except ValueError as error:
        raise ExportError(f"instance {sop}: unreadable array metadata (zarr.json)") from error
    if not isinstance(metadata, dict) or metadata.get("node_type") != "array":
        raise ExportError(f"instance {sop}: not a Radiarc instance array")
    attributes = metadata.get("attributes") or {}
    _check_exportable(attributes)
    objects = chunk_objects(archive.fs, array_path, metadata)
    stored = attributes["radiarc"].get("stored")
    if isinstance(stored, dict) and stored.get("sha256"):
        if stored.get("algorithm") != CHUNKS_DIGEST:
            raise ExportError(
                f"instance {sop}: unknown stored checksum algorithm {stored.get('algorithm')!r}"
            )
        if chunks_sha256(objects) != stored["sha256"]:
            raise ExportError(
                f"instance {sop}: stored chunks do not match the SHA-256 recorded at archive "
                "time (the archive was modified or is corrupt); nothing exported"
            )
    else:
        log.warning("instance %s has no stored checksum (archived before v2): not verified", sop)
    try:
        pixels = np.asarray(array_from_objects(metadata_json, objects)[...])
    except Exception as error:  # codec errors (corrupt stream, other weights) say why
        raise ExportError(
            f"instance {sop}: cannot decode: {type(error).__name__}: {error}"
        ) from error
    return attributes, pixels


def _check_exportable(attributes: dict[str, Any]) -> None:
    radiarc = attributes.get("radiarc")
    if not isinstance(radiarc, dict) or "dicom" not in attributes:
        raise ExportError("not a Radiarc instance array (no radiarc/dicom attributes)")
    if not radiarc.get("complete"):
        raise ExportError("the instance was not completely archived (interrupted write)")


def export_dataset(
    attributes: dict[str, Any], pixels: np.ndarray, *, uid_prefix: str | None = None
) -> Dataset:
    """The DICOM dataset of an archived array, from its attributes and decoded pixels."""
    _check_exportable(attributes)
    radiarc = attributes["radiarc"]
    facts, codec, quality = radiarc["pixels"], radiarc["codec"], radiarc["quality"]
    dataset = Dataset.from_json(attributes["dicom"])
    original_uid = str(dataset.get("SOPInstanceUID", ""))
    was_lossy = str(dataset.get("LossyImageCompression", "")).strip() == "01"

    _remove_group_lengths(dataset)
    _set_pixels(dataset, pixels, facts)
    if quality.get("max_abs_error") == 0 and original_uid:
        # Archived losslessly (`--max-error 0`), verified pixel for pixel when written: the
        # pixels are the original's, so this is the original instance, as after any lossless
        # transfer syntax; there is no lossy compression or derivation to record.
        new_uid = UID(original_uid)
    else:
        ratio = quality.get("ratio")
        _mark_lossy(dataset, ratio)
        _mark_derived(dataset, original_uid, was_lossy, _description(codec, quality))
        new_uid = UID(
            derived_uid(
                original_uid,
                codec["model_id"],
                codec["weights_hash"],
                codec["codec_key"],
                prefix=uid_prefix,
            )
        )
        now = datetime.now(UTC)  # a new instance (the original one keeps its own dates)
        dataset.InstanceCreationDate = now.strftime("%Y%m%d")
        dataset.InstanceCreationTime = now.strftime("%H%M%S")
    dataset.SOPInstanceUID = new_uid
    if "SOPClassUID" not in dataset:
        dataset.SOPClassUID = SecondaryCaptureImageStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    meta.MediaStorageSOPInstanceUID = new_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    dataset.file_meta = meta
    return dataset


def _remove_group_lengths(dataset: Dataset) -> None:
    """Group lengths (gggg,0000) of old ACR-NEMA files are retired and would be wrong now."""
    for tag in [element.tag for element in dataset if element.tag.element == 0]:
        del dataset[tag]


def _set_pixels(dataset: Dataset, pixels: np.ndarray, facts: dict[str, Any]) -> None:
    allocated = int(facts.get("bits_allocated") or 8 * pixels.dtype.itemsize)
    if allocated not in (8, 16):
        allocated = 8 * pixels.dtype.itemsize
    stored = int(facts["bits_stored"])
    dtype = np.dtype("<u1" if allocated == 8 else "<u2")
    values = np.ascontiguousarray(pixels.astype(dtype, copy=False))
    dataset.Rows, dataset.Columns = values.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = facts["photometric"]
    dataset.BitsAllocated = allocated
    dataset.BitsStored = stored
    dataset.HighBit = stored - 1
    dataset.PixelRepresentation = 0
    for keyword in ("NumberOfFrames", "PlanarConfiguration"):
        if keyword in dataset:
            del dataset[keyword]
    for keyword, value in (
        ("SmallestImagePixelValue", int(values.min())),
        ("LargestImagePixelValue", int(values.max())),
    ):
        if keyword in dataset:
            del dataset[keyword]
            setattr(dataset, keyword, value)
            dataset[keyword].VR = "US"
    dataset.PixelData = values.tobytes()
    dataset["PixelData"].VR = "OB" if allocated == 8 else "OW"


def _mark_lossy(dataset: Dataset, ratio: float | None) -> None:
    was_lossy = str(dataset.get("LossyImageCompression", "")).strip() == "01"
    ratios = _values(dataset, "LossyImageCompressionRatio") if was_lossy else []
    methods = _values(dataset, "LossyImageCompressionMethod") if was_lossy else []
    ratios.append(_decimal_string(ratio))
    methods.append(METHOD)
    dataset.LossyImageCompression = "01"
    dataset.LossyImageCompressionRatio = ratios
    dataset.LossyImageCompressionMethod = methods


def _values(dataset: Dataset, keyword: str) -> list[str]:
    value = dataset.get(keyword)
    if value is None or value == "":
        return []
    if isinstance(value, list | tuple | pydicom.multival.MultiValue):
        return [str(item) for item in value]
    return [str(value)]


def _decimal_string(value: float | None) -> str:
    """A DS value (at most 16 characters) for a ratio; 0 when unknown."""
    if value is None or not np.isfinite(value):
        return "0"
    return f"{value:.2f}"[:16]


def _description(codec: dict[str, Any], quality: dict[str, Any]) -> str:
    rate = (
        next(
            (
                f"{key}={codec[key]}"
                for key in ("iterations", "bpp", "min_ssim", "min_psnr", "max_error")
                if key in codec
            ),
            "",
        )
        + (" adaptive" if codec.get("adaptive") else "")
        + (" half-res" if codec.get("half_res") else "")
        + (" residual" if codec.get("residual") else "")
    )
    psnr = quality.get("psnr")
    parts = [
        f"Lossy compression by Radiarc learned codec {codec['model_id']} "
        f"(weights {codec['weights_hash']}, {rate}, tile {codec['tile_size']})",
        f"ratio {_decimal_string(quality.get('ratio'))}:1",
        f"{quality.get('bpp', 0):.3f} bpp",
        "PSNR lossless" if psnr is None else f"PSNR {psnr:.2f} dB",
        f"SSIM {quality.get('ssim', 0):.4f}",
    ]
    return ", ".join(parts)


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = meaning
    return item


def _mark_derived(dataset: Dataset, original_uid: str, was_lossy: bool, description: str) -> None:
    image_type = _values(dataset, "ImageType") or ["DERIVED", "PRIMARY"]
    image_type[0] = "DERIVED"
    if len(image_type) == 1:
        image_type.append("PRIMARY")
    dataset.ImageType = image_type

    earlier = str(dataset.get("DerivationDescription", "") or "").strip()
    text = f"{earlier}; {description}" if earlier else description
    dataset.DerivationDescription = text[-_DESCRIPTION_MAX:]

    codes = list(dataset.get("DerivationCodeSequence", []))
    codes.append(_code("113040", "Lossy Compression"))
    dataset.DerivationCodeSequence = Sequence(codes)

    reference = Dataset()
    reference.ReferencedSOPClassUID = dataset.get("SOPClassUID", SecondaryCaptureImageStorage)
    reference.ReferencedSOPInstanceUID = original_uid
    purpose = (
        _code("121330", "Lossy compressed predecessor")
        if was_lossy
        else _code("121320", "Uncompressed predecessor")
    )
    reference.PurposeOfReferenceCodeSequence = Sequence([purpose])
    sources = list(dataset.get("SourceImageSequence", []))
    sources.append(reference)
    dataset.SourceImageSequence = Sequence(sources)
