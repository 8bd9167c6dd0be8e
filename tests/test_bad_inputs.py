"""Bad inputs (issue #7): a hostile export through one real migration, corrupt archive chunks,
refusals that allocate nothing, and property tests of the DICOM reader and of UIDs as archive
paths.

The hostile export holds good files and every kind of bad one: empty, text, PNG, truncated,
bit-flipped (header, marker, pixel data, fragment item), hostile UIDs (separators, ``..``,
leading dot, NUL, 200 characters, empty, a patient value), declared sizes that would need
gigabytes (60000 x 60000 pixels, a lying pixel-data length, a JPEG 2000 codestream that
disagrees with its header, a deflate bomb), a file over the source size limit, a named pipe,
a file named in Latin-1, and a duplicate under another name. One migration over it must
finish, archive every good file, give each bad file one row whose reason names the problem
(and no patient value) or count it as not DICOM, write nothing outside the archive and leave
the export as it was.

The property tests share their properties and strategies with the longer fuzzing run
(``python -m storage.fuzz``, docs/reliability.md) and keep to few examples for CI.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from collections import Counter
from dataclasses import dataclass, replace
from datetime import timedelta
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian
from storage_helpers import CHEAP, MONO1, PATIENT, PNGS, REAL_DICOMS, RG3, small_pngs, synthetic_phi

from codec import bitstream
from codec.bitstream import BitstreamError
from codec.io import GrayImage
from codec.zarr_codec import RadiarcZarrCodec
from storage.archive import Archive, RunContext, archive_instance
from storage.dicom import MAX_INFLATED, DicomError, read_dicom
from storage.fuzz import check_dicom, check_uid_path, hostile_uid_bytes, mutated, seed_phi
from storage.layout import instance_path
from storage.manifest import read_manifest
from storage.scan import MAX_SOURCE_BYTES
from storage.source import SourceImage

CONTEXT = RunContext("bad-inputs", worker="tester")
#: One encoder of half a CPU, 2 iterations on 32-pixel tiles: the pipeline is under test.
MIGRATION: dict[str, Any] = {
    "codec": {"tile_size": 32, "rate": {"iterations": 2}},
    "ray": {"workers": 1, "cpus_per_worker": 0.5, "batch_images": 8, "tile_batch": 16},
    "manifest": {"flush_rows": 100},
    "report": {"worst_images": 1, "crop": 32},
}
PATIENT_FOLDER = PATIENT.name  # good files live in a folder named after the patient


# ------------------------------------------------------------------ hostile files


def flip(data: bytes, offset: int, bit: int) -> bytes:
    changed = bytearray(data)
    changed[offset] ^= 1 << bit
    return bytes(changed)


@functools.cache
def crops() -> list[GrayImage]:
    return small_pngs(24, side=48)


def dataset(index: int, **attributes: str) -> Dataset:
    """A 48 x 48 synthetic DX instance of the fictitious patient, one UID set per index."""
    result = synthetic_dicom_of(crops()[index], f"bad-inputs:{index}")
    for keyword, value in attributes.items():
        setattr(result, keyword, value)
    return result


def synthetic_dicom_of(image: GrayImage, seed: str) -> Dataset:
    from storage.synth import synthetic_dicom

    return synthetic_dicom(image, seed, patient=PATIENT, study_seed="bad-inputs")


def to_bytes(ds: Dataset, acr_nema: bool = False) -> bytes:
    from storage.synth import dicom_bytes

    return dicom_bytes(ds, acr_nema=acr_nema)


def huge_dimensions() -> bytes:
    """60000 x 60000 at 16 bits (7.2 GB of pixels) declared, 8 bytes of pixel data."""
    ds = synthetic_dicom_of(GrayImage(np.zeros((2, 2), np.uint16), 16), "bad-inputs:huge")
    ds.Rows = ds.Columns = 60000
    return to_bytes(ds)


def lying_length() -> bytes:
    """11000 x 11000 at 16 bits (under the pixel limit) with a pixel data element whose
    length matches that (242 MB) while the file ends 64 bytes into it."""
    ds = synthetic_dicom_of(GrayImage(np.zeros((4, 8), np.uint16), 16), "bad-inputs:lying")
    ds.Rows = ds.Columns = 11000
    data = bytearray(to_bytes(ds))
    at = data.rindex(b"\xe0\x7f\x10\x00OW\x00\x00")
    struct.pack_into("<I", data, at + 8, 11000 * 11000 * 2)
    return bytes(data)


def codestream_bomb(side: int) -> bytes:
    """The real JPEG 2000 file with its codestream (SIZ) saying ``side`` x ``side`` while the
    header still says 1760 x 1760: decoders allocate what the codestream says (20000: 2.4 GB
    of RSS for an 832 KB file; 60000: more than this machine has)."""
    data = bytearray(RG3.read_bytes())
    at = data.index(b"\xff\x4f\xff\x51")  # SOC, SIZ
    struct.pack_into(">II", data, at + 8, side, side)
    return bytes(data)


def fragment_flip() -> bytes:
    """The real JPEG 2000 file with one bit of its first fragment's item tag flipped."""
    data = bytearray(RG3.read_bytes())
    at = data.index(b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff") + 12  # offset table item
    (table_length,) = struct.unpack_from("<I", data, at + 4)
    data[at + 8 + table_length + 2] ^= 0x01  # (FFFE,E000) -> (FFFE,E001)
    return bytes(data)


def deflate_bomb(inflated: int = 512 << 20) -> bytes:
    """A Deflated Explicit VR file whose dataset inflates to ``inflated``
    bytes (2.3 MB at 512 MiB): a private OB element of zeros after an ordinary header."""
    ds = dataset(7)
    del ds.PixelData
    body = io.BytesIO()
    pydicom.dcmwrite(body, ds, implicit_vr=False, little_endian=True, enforce_file_format=False)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(pydicom.filebase.DicomFileLike(out), meta, enforce_standard=True)
    packer = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    element = struct.pack("<HH2sHI", 0x7FE1, 0x0010, b"OB", 0, inflated)
    out.write(packer.compress(body.getvalue() + element))
    block = bytes(1 << 20)
    for _ in range(inflated >> 20):
        out.write(packer.compress(block))
    out.write(packer.flush())
    return out.getvalue()


@dataclass(frozen=True)
class Case:
    """One file of the hostile export and what the migration must make of it."""

    name: str
    path: str  # relative to the export
    data: bytes
    outcome: str  # archived | skipped | not DICOM | duplicate
    reason: str = ""  # regular expression the row's (or the not-DICOM) reason must match
    size: int = 0  # extend the file to this size with a hole (no disk used)

    @property
    def checksum(self) -> str:
        return "sha256:" + sha256(self.data).hexdigest()


def hostile_cases() -> list[Case]:
    good = [to_bytes(dataset(0)), to_bytes(dataset(1)), to_bytes(dataset(2), acr_nema=True)]
    flipped_pixels = to_bytes(dataset(3))
    truncated = to_bytes(dataset(4))[:-1000]
    rows = to_bytes(dataset(5))
    rows = flip(rows, rows.index(b"\x28\x00\x10\x00US") + 8, 4)  # Rows 48 -> 32
    marker = flip(to_bytes(dataset(6)), 128, 0)  # 'DICM' -> 'EICM'
    patient_folder = f"{PATIENT_FOLDER}/study1"
    not_dicom = r"not DICOM \(no 'DICM' marker and no ACR-NEMA element at the start\)"
    uid_cases = [
        ("study-slash", {"StudyInstanceUID": "1.2/../../../../outside"}, "StudyInstanceUID "
         r"\(value not shown\) is not a DICOM UID"),
        ("series-backslash", {"SeriesInstanceUID": "1.2\\3"}, "SeriesInstanceUID "
         r"\(value not shown\) is not a DICOM UID"),
        ("sop-dotdot", {"SOPInstanceUID": ".."}, r"SOPInstanceUID '\.\.' is not a DICOM UID"),
        ("study-leading-dot", {"StudyInstanceUID": ".1.2.3"},
         r"StudyInstanceUID '\.1\.2\.3' is not a DICOM UID"),
        ("series-nul", {"SeriesInstanceUID": "1.2\x00.3"}, "SeriesInstanceUID "
         r"\(value not shown\) is not a DICOM UID"),
        ("sop-200-characters", {"SOPInstanceUID": "1." + "2" * 198},
         r"SOPInstanceUID is 200 characters long \(a UID has at most 64\)"),
        ("study-empty", {"StudyInstanceUID": ""}, r"StudyInstanceUID is missing or empty"),
        ("sop-patient-id", {"SOPInstanceUID": PATIENT.patient_id},
         r"SOPInstanceUID '<redacted>' is not a DICOM UID"),
    ]  # fmt: skip
    cases = [
        Case("good-0", f"{patient_folder}/IMG0.dcm", good[0], "archived"),
        Case("good-1", f"{patient_folder}/IMG1", good[1], "archived"),
        Case("good-acr-nema", "good/IMG2", good[2], "archived"),
        # A name in Latin-1 (bytes E9 FF), not UTF-8: Python sees surrogate escapes.
        Case("good-latin1-name", "good/IM\udce9\udcff.dcm", to_bytes(dataset(8)), "archived"),
        # Uncompressed pixels carry no checksum: a flipped pixel is a valid (other) image.
        Case("pixel-flip", "bad/pixel-flip.dcm", flip(flipped_pixels, -100, 4), "archived"),
        Case("duplicate", "dup/copy-of-IMG0.bin", good[0], "duplicate"),
        Case("empty", "bad/empty.dcm", b"", "not DICOM", r"empty file \(0 bytes\)"),
        Case("text", "bad/notes.txt", b"Findings: none.\n" * 20, "not DICOM", not_dicom),
        Case("png", "bad/image.dcm", PNGS[0].read_bytes(), "not DICOM", not_dicom),
        Case("marker-flip", "bad/marker-flip.dcm", marker, "not DICOM", not_dicom),
        Case(
            "oversized",  # a multi-frame series or a video: a reader would hold it whole
            "bad/tomosynthesis.dcm",
            to_bytes(dataset(23)),
            "not DICOM",
            rf"larger than {MAX_SOURCE_BYTES >> 20} MiB: not a single-frame image",
            MAX_SOURCE_BYTES + 1,
        ),
        Case(
            "truncated",
            "bad/truncated.dcm",
            truncated,
            "skipped",
            r"pixel data is 1304 bytes but 48x48 at 8 bits needs 2304 \(truncated file",
        ),
        Case(
            "rows-flip",
            "bad/rows-flip.dcm",
            rows,
            "skipped",
            r"pixel data is 2304 bytes but 32x48 at 8 bits needs 1536",
        ),
        Case(
            "fragment-flip",
            "bad/fragment-flip.dcm",
            fragment_flip(),
            "skipped",
            r"corrupt encapsulated pixel data \(tag \(FFFE,E001\)\)",
        ),
        Case(
            "codestream-bomb",
            "bad/codestream-bomb.dcm",
            codestream_bomb(20000),  # should this regress: 2.4 GB, caught by the RSS check
            "skipped",
            r"compressed pixel data declares 20000x20000 pixels but the header says 1760x1760",
        ),
        Case(
            "huge-dimensions",
            "bad/huge.dcm",
            huge_dimensions(),
            "skipped",
            r"implausible image dimensions 60000x60000",
        ),
        Case(
            "lying-length",
            "bad/lying-length.dcm",
            lying_length(),
            "skipped",
            r"pixel data is 64 bytes but 11000x11000 at 16 bits needs 242000000",
        ),
        Case(
            "deflate-bomb",
            "bad/deflate-bomb.dcm",
            deflate_bomb(),
            "skipped",
            rf"deflated dataset inflates to more than {MAX_INFLATED >> 20} MiB",
        ),
        Case(
            "sop-empty",
            "uids/sop-empty",
            to_bytes(dataset(20, SOPInstanceUID=""), acr_nema=True),
            "skipped",
            r"SOPInstanceUID is missing or empty",
        ),
    ]
    for index, (name, attributes, reason) in enumerate(uid_cases):
        data = to_bytes(dataset(10 + index, **attributes))
        cases.append(Case(name, f"uids/{name}.dcm", data, "skipped", reason))
    return cases


def write_cases(root: Path, cases: list[Case]) -> None:
    for case in cases:
        target = root / case.path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(case.data)
        if case.size:
            os.truncate(target, case.size)


def tree(root: Path) -> set[str]:
    """Every file and folder under ``root``, relative (symlinks not followed)."""
    found = set()
    for folder, folders, files in os.walk(root, followlinks=False):
        for name in folders + files:
            found.add(os.path.relpath(os.path.join(folder, name), root))
    return found


# ------------------------------------------------------------------ one real migration


@pytest.mark.usefixtures("prefect_api", "local_ray")
@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom, writing the hostile UIDs
def test_hostile_export_gives_one_clear_row_per_bad_file_and_writes_only_the_archive(
    tmp_path: Path, guarded_export: Any
) -> None:
    from flows.migrate import migrate_flow

    export, archive = tmp_path / "export", tmp_path / "archive"
    cases = hostile_cases()
    write_cases(export, cases)
    os.mkfifo(export / "bad" / "pipe.dcm")  # opened to sniff, it would block forever
    guarded_export(export)  # the export is checksummed now and compared at teardown
    before = tree(tmp_path)

    summary = migrate_flow(str(export), str(archive), settings=MIGRATION)

    expected = Counter(case.outcome for case in cases)
    assert (summary.archived, summary.skipped, summary.failed, summary.not_dicom) == (
        expected["archived"],
        expected["skipped"],
        0,
        expected["not DICOM"],
    )
    assert summary.files_listed == len(cases) and summary.already_done == expected["duplicate"]
    # Nothing was even allocated for the bombs: the encoder stayed at its usual size.
    assert summary.peak_worker_rss_mb < 2000

    rows = read_manifest(str(archive)).to_pylist()
    by_checksum: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_checksum.setdefault(row["source_checksum"], []).append(row)
    assert len(rows) == sum(1 for c in cases if c.outcome in ("archived", "skipped"))
    phi = [*synthetic_phi(), *seed_phi([("rg3", RG3.read_bytes())])]
    for case in cases:
        found = by_checksum.get(case.checksum, [])
        if case.outcome == "not DICOM":
            assert found == [], case.name
            continue
        assert len(found) == 1, f"{case.name}: {len(found)} rows"  # duplicates included
        (row,) = found
        expected_status = "archived" if case.outcome == "duplicate" else case.outcome
        assert row["status"] == expected_status, (case.name, row["reason"])
        if case.reason:
            assert re.search(case.reason, row["reason"] or ""), (case.name, row["reason"])
        for value in phi:
            assert value not in (row["reason"] or ""), (case.name, row["reason"])
    assert any(r["source_uri"].endswith("/good/IM\\xe9\\xff.dcm") for r in rows)

    report = (archive / "reports" / summary.run_id / "report.md").read_text()
    for case in cases:
        if case.outcome == "not DICOM":
            assert case.reason.replace("\\", "") in report, case.name

    # Nothing outside the archive: the rest of the tree is as it was (the export also by
    # content: guarded_export), and everything inside it stays inside it.
    assert {path for path in tree(tmp_path) - before if not path.startswith("archive")} == set()
    root = archive.resolve()
    for path in tree(root):
        full = root / path
        assert not full.is_symlink() and full.resolve().is_relative_to(root), path
    archived = {c.name: read_dicom(c.data).header for c in cases if c.outcome == "archived"}
    paths = {"/".join(instance_path(header)) for header in archived.values()}
    arrays = {
        str(meta.parent.relative_to(root))
        for meta in root.rglob("zarr.json")
        if json.loads(meta.read_text())["node_type"] == "array"
    }
    assert arrays == paths
    assert {p.name for p in root.iterdir()} == {"zarr.json", "manifests", "reports"} | {
        path.split("/")[0] for path in paths
    }
    for path in paths:
        array = zarr.open_array(str(root / path), mode="r")
        assert array.attrs["radiarc"]["complete"] is True and array[...].shape == (48, 48)


# ------------------------------------------------------------------ refusals allocate nothing

_BOMB_CHILD = """
import json, resource, sys, tracemalloc
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # a regression fails, not the box
from storage.dicom import DicomError, read_dicom
results = {}
for path in sys.argv[1:]:
    tracemalloc.start()
    try:
        read_dicom(path)
        outcome = "decoded"
    except DicomError as error:
        outcome = error.reason
    except BaseException as error:
        outcome = f"{type(error).__name__}: {error}"
    results[path] = [outcome, tracemalloc.get_traced_memory()[1]]
    tracemalloc.stop()
# The peak of this process's own memory (ru_maxrss would include the parent's, at fork).
status = open("/proc/self/status").read().split("VmHWM:")[1]
results["maxrss_mb"] = int(status.split()[0]) / 1024
print(json.dumps(results))
"""


def test_declared_sizes_are_refused_before_anything_is_allocated(tmp_path: Path) -> None:
    """Read from paths (a file object's read allocates what it is asked for) in a fresh
    process under a 3 GiB address-space limit: Python allocations traced per file, the
    process's peak RSS overall. Before the fixes in storage/dicom.py these took 4 GiB (the
    lying length, from a path), 2.4 GB (the 1 GiB deflate bomb) and ~14 GB (JPEG 2000)."""
    small = bytearray(to_bytes(dataset(9)))
    at = small.rindex(b"\xe0\x7f\x10\x00OB\x00\x00")
    struct.pack_into("<I", small, at + 8, 0xFFFFFFF0)  # 4 GB declared, 2304 bytes present
    files = {
        "huge.dcm": (huge_dimensions(), "implausible image dimensions 60000x60000"),
        "lying.dcm": (lying_length(), "pixel data is 64 bytes but 11000x11000"),
        "j2k.dcm": (codestream_bomb(60000), "declares 60000x60000 pixels"),
        "deflate.dcm": (deflate_bomb(1 << 30), "deflated dataset inflates to more than"),
        "last-element.dcm": (bytes(small), "decoded"),  # the short read is all there is
    }
    for name, (data, _) in files.items():
        (tmp_path / name).write_bytes(data)
    paths = [str(tmp_path / name) for name in files]
    done = subprocess.run(
        [sys.executable, "-c", _BOMB_CHILD, *paths],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[1],
        check=True,
    )
    results = json.loads(done.stdout.splitlines()[-1])
    for name, (data, expected) in files.items():
        outcome, peak = results[str(tmp_path / name)]
        assert expected in outcome, (name, outcome)
        # Bounded by the file's own size, never by what it declares (gigabytes here).
        assert peak < 3 * len(data) + (4 << 20), f"{name}: {peak / 2**20:.0f} MiB allocated"
    assert results["maxrss_mb"] < 400, results["maxrss_mb"]


def test_fuzz_findings_are_refused_with_a_dicom_error() -> None:
    """Inputs ``python -m storage.fuzz`` found: a zero-length pixel data element (pydicom
    reads it as None) raised TypeError; an element of unknown VR raised NotImplementedError
    when first read."""
    empty = dataset(21)
    empty.PixelData = b""
    with pytest.raises(DicomError, match=r"pixel data \(7FE0,0010\) is empty"):
        read_dicom(to_bytes(empty))
    data = to_bytes(dataset(22))
    at = data.index(b"\x28\x00\x04\x00CS")  # Photometric Interpretation, VR CS -> "CR"
    unknown_vr = data[: at + 4] + b"CR" + data[at + 6 :]
    with pytest.raises(DicomError, match=r"unreadable PhotometricInterpretation \(NotImpl"):
        read_dicom(unknown_vr)


# ------------------------------------------------------------------ corrupt archive chunks


def test_every_bit_flip_in_a_stored_chunk_raises_the_stream_error_or_is_harmless(
    tmp_path: Path, one_thread_torch: None
) -> None:
    archive = Archive(str(tmp_path / "a.zarr"))
    data = to_bytes(dataset(0))
    source = SourceImage("/exports/x", read_dicom(data), len(data), sha256(data).hexdigest())
    row = archive_instance(archive, source, replace(CHEAP, tile_size=32), CONTEXT)
    assert row.status == "archived"
    path = f"{row.study_instance_uid}/{row.series_instance_uid}/{row.sop_instance_uid}"
    good = np.asarray(archive.open_array(path)[...])
    chunk = tmp_path / "a.zarr" / path / "c" / "0" / "0"
    original = chunk.read_bytes()
    messages: Counter[str] = Counter()
    for offset in range(len(original)):
        for bit in (0, 6):
            chunk.write_bytes(flip(original, offset, bit))
            try:
                decoded = np.asarray(archive.open_array(path)[...])
            except BitstreamError as error:
                messages[re.sub(r"\d+", "N", str(error))] += 1
                continue
            assert np.array_equal(decoded, good), f"silent garbage: byte {offset} bit {bit}"
            messages["harmless"] += 1
    chunk.write_bytes(original)
    assert np.array_equal(np.asarray(archive.open_array(path)[...]), good)
    assert messages["harmless"] <= 2  # the pad value of a chunk without padding
    assert messages["tile N checksum mismatch (corrupt stream)"] > 10  # the coded payload
    assert messages["header checksum mismatch (corrupt stream)"] > 10  # the stream header
    assert messages["not a Radiarc chunk stream (bad magic bytes)"] == 8


def test_a_flipped_pad_value_inside_the_image_is_detected(
    tmp_path: Path, one_thread_torch: None
) -> None:
    pixels = np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)
    pixels[24:, :] = 77  # flat trailing rows: coded as "pad value 77", not by the network
    array = zarr.create_array(
        str(tmp_path / "a.zarr"),
        shape=pixels.shape,
        chunks=pixels.shape,
        dtype="uint8",
        serializer=RadiarcZarrCodec(iterations=2, bits_stored=8),
        compressors=None,
        fill_value=0,
    )
    array[...] = pixels
    good = array[...]
    chunk = tmp_path / "a.zarr" / "c" / "0" / "0"
    chunk.write_bytes(flip(chunk.read_bytes(), 14, 0))  # low byte of the pad value
    with pytest.raises(BitstreamError, match="envelope checksum"):  # chunk envelope version 2
        zarr.open_array(str(tmp_path / "a.zarr"), mode="r")[...]
    assert good[24:].min() == 77


def test_streams_that_pass_their_checksums_still_fail_cleanly(one_thread_torch: None) -> None:
    """Found by the fuzzer: resealed streams (valid CRCs) with more iterations than the model
    has, or with segments the entropy coder rejects, raised ValueError / AssertionError."""
    from codec.learned import decode_image
    from storage.fuzz import codec_seeds

    streams, _ = codec_seeds()
    stream = bitstream.unpack(streams[0])
    many = bitstream.Stream(stream.header, [segments * 12 for segments in stream.tiles])
    with pytest.raises(BitstreamError, match="more iterations than the model's"):
        decode_image(bitstream.pack(many))
    junk = bitstream.Stream(stream.header, [[b"\xff" * 8] for _ in stream.tiles])
    with pytest.raises(BitstreamError, match="entropy-coded segment does not decode"):
        decode_image(bitstream.pack(junk))


# ------------------------------------------------------------------ the source guard


def test_the_source_guard_reports_changed_added_and_removed_files(
    tmp_path: Path, guarded_export: Any
) -> None:
    export = tmp_path / "copy"
    (export / "sub").mkdir(parents=True)
    shutil.copy(MONO1, export / "sub" / "chest")
    (export / "notes.txt").write_text("original\n")
    guard = guarded_export(export)
    guard.check()  # unchanged

    target = export / "sub" / "chest"
    original = target.read_bytes()
    target.write_bytes(flip(original, 5000, 0))  # same size, one bit
    with pytest.raises(AssertionError, match=r"was modified: changed: sub/chest"):
        guard.check()
    target.write_bytes(original)
    (export / "new.dcm").write_bytes(b"x")
    with pytest.raises(AssertionError, match=r"added: new\.dcm"):
        guard.check()
    (export / "new.dcm").unlink()
    (export / "notes.txt").rename(tmp_path / "elsewhere.txt")
    with pytest.raises(AssertionError, match=r"removed: notes\.txt"):
        guard.check()
    (tmp_path / "elsewhere.txt").rename(export / "notes.txt")
    guard.check()  # restored: teardown's check passes too


# ------------------------------------------------------------------ properties (CI)

REAL_PHI = seed_phi([(path.name, path.read_bytes()) for path in REAL_DICOMS])


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on damaged headers
@settings(
    max_examples=60,
    deadline=timedelta(seconds=10),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(mutated([path.read_bytes() for path in REAL_DICOMS]))
def test_mutated_real_dicoms_decode_or_raise_dicom_error(data: bytes) -> None:
    """Flips, overwrites, truncations, insertions of the real files: an image within the
    pixel contract or a DicomError naming the problem, nothing else, in bounded time."""
    check_dicom(data, name="mutant", phi=REAL_PHI)


@settings(max_examples=300, deadline=timedelta(seconds=2))
@given(st.tuples(hostile_uid_bytes(), hostile_uid_bytes(), hostile_uid_bytes()), st.booleans())
def test_hostile_uid_bytes_become_a_safe_relative_path_or_uid_error(
    values: tuple[bytes, bytes, bytes], lenient: bool
) -> None:
    """Raw UID bytes as a file holds them (any text, separators, NUL, over 64 characters):
    study/series/sop of digits and dots, or a UIDError that quotes nothing hostile."""
    check_uid_path(values, lenient)
