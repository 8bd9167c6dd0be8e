"""Fault-injection run: every fault of docs/reliability.md against real migrations, measured.

    python -m flows.chaos [--images 24] [--kills 20] [--fuzz-minutes 2] [--only NAME,...]
                          [--out docs/bench/chaos]

Starts what a migration needs here (a local Ray of 2 CPUs, a temporary Prefect API, moto's S3
server on 127.0.0.1) and runs each scenario on a fresh export of ``--images`` real X-ray crops
as DICOM:

- ``encoder-killed`` / ``node-lost``: encoders SIGKILLed in the middle of a batch, one or all;
- ``encode-exception`` / ``poison-file``: fail points (flows/failpoints.py) make one file
  raise while encoding, or kill every encoder process that touches it;
- ``s3-outage``: the S3 server stopped mid-run and started again 5 s later;
- ``s3-throttling``: 503 SlowDown on 15% of requests and 15% of bodies cut short, then 500s;
- ``s3-unreadable``: one object that always answers 500;
- ``driver-kills``: the driver SIGKILLed ``--kills`` times at random moments, each followed by
  a resume; the result is compared with an uninterrupted run of the same export;
- ``fuzz``: ``python -m storage.fuzz`` for ``--fuzz-minutes`` per target.

After each scenario's runs (a fault-free run finishes what the faults stopped) it checks the
invariants (storage.invariants.archive_invariants) and that the source export is byte-identical
to before. Prints a table and writes ``results.json`` and ``summary.md`` to ``--out``; exits 1
if any scenario broke an invariant.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows import failpoints
from flows.faultkit import busy_encoder_pids, kill, kill_and_resume
from flows.migrate import RunSummary, migrate_flow
from storage.faults import FaultPlan, RestartableMotoServer, S3FaultProxy
from storage.invariants import archive_fingerprint, archive_invariants, manifest_outcome
from storage.synth import crops, write_export

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
BASE_SETTINGS: dict[str, Any] = {
    "codec": {"tile_size": 32, "rate": {"iterations": 2}},
    "ray": {"workers": 2, "cpus_per_worker": 0.5, "batch_images": 2, "max_restarts": 2},
    "manifest": {"flush_rows": 2},
    "report": {"enabled": False},
}
ONE_AT_A_TIME: dict[str, Any] = {
    **BASE_SETTINGS,
    "ray": {"workers": 1, "cpus_per_worker": 0.5, "batch_images": 1, "in_flight": 1},
    "manifest": {"flush_rows": 1},
}
#: Few retries inside botocore, so faults reach Radiarc's own retries.
CLIENT: dict[str, Any] = {
    "skip_instance_cache": True,
    "config_kwargs": {"retries": {"max_attempts": 2}},
}


@dataclass
class Lab:
    """Where scenarios run: a scratch folder, the S3 server, Prefect's and Ray's addresses."""

    root: Path
    s3: RestartableMotoServer
    prefect_api: str
    ray_address: str
    images: int
    kills: int
    fuzz_minutes: float
    exports: dict[str, tuple[dict[str, Any] | None, str]] = field(default_factory=dict)

    def sources_unchanged(self) -> dict[str, bool]:
        """Per export made so far: is every byte as it was written?"""
        return {
            uri: export_digest(uri, options) == digest
            for uri, (options, digest) in self.exports.items()
        }

    def export(self, name: str, on_s3: bool = False, images: int | None = None) -> str:
        uri = self._write_export(name, on_s3, images or self.images)
        options = {"endpoint_url": self.s3.url} if on_s3 else None
        self.exports[uri] = (options, export_digest(uri, options))
        return uri

    def _write_export(self, name: str, on_s3: bool, images: int) -> str:
        from codec.io import read_png

        pngs = [read_png(path) for path in sorted(DATA.glob("*.png"))]
        pool = [tile for i, png in enumerate(pngs) for tile in crops(png, 96, images, seed=i)]
        if on_s3:
            import s3fs

            s3fs.S3FileSystem(endpoint_url=self.s3.url, skip_instance_cache=True).mkdir(name)
            uri = f"s3://{name}/export"
            write_export(uri, pool[:images], storage_options={"endpoint_url": self.s3.url})
            return uri
        uri = str(self.root / name / "export")
        write_export(uri, pool[:images])
        return uri


def settings_with(base: dict[str, Any], **ray: Any) -> dict[str, Any]:
    merged = json.loads(json.dumps(base))
    merged["ray"].update(ray)
    return merged


def counts(summary: RunSummary) -> dict[str, int]:
    return {
        "archived": summary.archived,
        "failed": summary.failed,
        "done_before": summary.already_done,
    }


def export_digest(uri: str, options: dict[str, Any] | None = None) -> str:
    from storage.fsutil import open_fs

    fs, root = open_fs(uri, options)
    digest = hashlib.sha256()
    for path in sorted(fs.find(root)):
        digest.update(path.encode())
        digest.update(fs.cat_file(path))
    return digest.hexdigest()


def finish(
    source: str, archive: str, options: dict[str, Any] | None, runs: list[dict[str, int]]
) -> dict[str, Any]:
    """A fault-free run to finish, then the invariants."""
    settings = {**BASE_SETTINGS, "source_options": options or {}, "archive_options": options or {}}
    runs.append(counts(migrate_flow(source, archive, settings=settings)))
    invariants = archive_invariants(archive, options)
    statuses = Counter(invariants.latest.values())
    return {"runs": runs, "final": dict(statuses), "invariants_hold": invariants.hold}


def encoders_killed(lab: Lab, all_at_once: bool) -> dict[str, Any]:
    source = lab.export("node-lost" if all_at_once else "encoder-killed")
    archive = str(Path(source).parent / "archive")
    stop, kills = threading.Event(), list[int]()

    def killer() -> None:
        while not stop.is_set() and len(kills) < 3:
            busy = busy_encoder_pids()
            if busy:
                kills.append(kill(busy if all_at_once else busy[:1]))
                time.sleep(1.5)
            time.sleep(0.02)

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        first = migrate_flow(source, archive, settings=BASE_SETTINGS)
    finally:
        stop.set()
        thread.join()
    return {
        "injected": f"{sum(kills)} encoder processes SIGKILLed mid-batch",
        **finish(source, archive, None, [counts(first)]),
    }


def with_failpoint(lab: Lab, action: str) -> dict[str, Any]:
    source = lab.export(f"failpoint-{action}")
    archive = str(Path(source).parent / "archive")
    victim = sorted(p for p in Path(source).rglob("*") if p.is_file())[3]
    key = "sha256:" + hashlib.sha256(victim.read_bytes()).hexdigest()
    os.environ[failpoints.ENV] = json.dumps({"encode": {key: action}})
    try:
        settings = settings_with(BASE_SETTINGS, max_restarts=0 if action == "crash" else 2)
        first = migrate_flow(source, archive, settings=settings)
    finally:
        os.environ.pop(failpoints.ENV, None)
    from storage.manifest import read_manifest

    reasons = sorted({r["reason"] for r in read_manifest(archive).to_pylist() if r["reason"]})
    return {
        "injected": f"fail point encode={action} on 1 file",
        "reasons": reasons,
        **finish(source, archive, None, [counts(first)]),
    }


def s3_outage(lab: Lab) -> dict[str, Any]:
    import s3fs

    source = lab.export("outage", on_s3=True)
    archive = "s3://outage/archive"
    options = {"endpoint_url": lab.s3.url, **CLIENT}
    fs = s3fs.S3FileSystem(endpoint_url=lab.s3.url, skip_instance_cache=True)
    down: list[float] = []

    def outage() -> None:
        deadline = time.monotonic() + 120
        while not fs.exists("outage/archive/manifests") and time.monotonic() < deadline:
            time.sleep(0.1)
        lab.s3.stop()
        started = time.monotonic()
        time.sleep(5)
        lab.s3.start()
        down.append(time.monotonic() - started)

    thread = threading.Thread(target=outage)
    thread.start()
    settings = {**BASE_SETTINGS, "source_options": options, "archive_options": options}
    try:
        first = migrate_flow(source, archive, settings=settings)
    finally:
        thread.join()
    return {
        "injected": f"S3 server down {down[0]:.1f} s mid-run",
        **finish(source, archive, {"endpoint_url": lab.s3.url}, [counts(first)]),
    }


def s3_flaky(lab: Lab, plans: list[FaultPlan], name: str, label: str) -> dict[str, Any]:
    source = lab.export(name, on_s3=True)
    archive = f"s3://{name}/archive"
    runs = []
    with _proxy(lab.s3.url) as proxy:
        options = {"endpoint_url": proxy.url, **CLIENT}
        settings = {**BASE_SETTINGS, "source_options": options, "archive_options": options}
        started = time.monotonic()
        for plan in plans:
            proxy.plan = plan
            runs.append(counts(migrate_flow(source, archive, settings=settings)))
        elapsed = time.monotonic() - started
        injected = {k: v for k, v in proxy.counts.items() if k != "requests"}
    result = finish(source, archive, {"endpoint_url": lab.s3.url}, runs)
    return {
        "injected": f"{label}: {injected} of {proxy.counts['requests']} requests",
        "faulty_runs_seconds": round(elapsed, 1),
        **result,
    }


@contextmanager
def _proxy(upstream: str) -> Iterator[S3FaultProxy]:
    proxy = S3FaultProxy(upstream, seed=11).start()
    try:
        yield proxy
    finally:
        proxy.stop()


def driver_kills(lab: Lab) -> dict[str, Any]:
    source = lab.export("driver-kills", images=2 * lab.kills)  # images left for every kill
    base = Path(source).parent
    env = {**os.environ, "PREFECT_API_URL": lab.prefect_api, "RAY_ADDRESS": lab.ray_address}
    started = time.monotonic()
    kills = kill_and_resume(source, str(base / "killed"), ONE_AT_A_TIME, lab.kills, env=env, seed=5)
    final = migrate_flow(source, str(base / "killed"), settings=ONE_AT_A_TIME)
    migrate_flow(source, str(base / "reference"), settings=ONE_AT_A_TIME)
    manifests = [manifest_outcome(str(base / name)) for name in ("killed", "reference")]
    archives = [archive_fingerprint(str(base / name)) for name in ("killed", "reference")]
    same_manifest, same_archive = manifests[0] == manifests[1], archives[0] == archives[1]
    differences = sorted(
        {
            f"manifest.{field}"
            for key in manifests[0]
            for field, value in manifests[0][key].items()
            if manifests[1].get(key, {}).get(field) != value
        }
        | {
            f"array {key}: {_listing(base / 'killed' / key)} "
            f"vs {_listing(base / 'reference' / key)}"
            for key in archives[0]
            if archives[1].get(key) != archives[0][key]
        }
    )
    invariants = archive_invariants(str(base / "killed"))
    return {
        "injected": f"{sum(k.killed for k in kills)} SIGKILLs of the driver in a row, "
        f"{2 * lab.kills} images (images recorded after each: "
        f"{[k.manifest_parts for k in kills]})",
        "runs": [{"archived_by_final_resume": final.archived, "done_before": final.already_done}],
        "final": dict(Counter(invariants.latest.values())),
        "equal_to_uninterrupted": same_manifest and same_archive,
        "differences": differences,
        "invariants_hold": invariants.hold and same_manifest and same_archive,
        "seconds": round(time.monotonic() - started, 1),
    }


def _listing(folder: Path) -> list[str]:
    """Files of an array folder with their sizes, to show how two copies differ."""
    return sorted(
        f"{p.relative_to(folder)}:{p.stat().st_size}" for p in folder.rglob("*") if p.is_file()
    )


def fuzz(lab: Lab) -> dict[str, Any]:
    command = [sys.executable, "-m", "storage.fuzz", "--minutes", str(lab.fuzz_minutes)]
    done = subprocess.run(command, capture_output=True, text=True)
    return {
        "injected": f"storage.fuzz, {lab.fuzz_minutes} min per target",
        "output": done.stdout.strip().splitlines()[-12:],
        "invariants_hold": done.returncode == 0,
    }


SCENARIOS: dict[str, Callable[[Lab], dict[str, Any]]] = {
    "encoder-killed": lambda lab: encoders_killed(lab, all_at_once=False),
    "node-lost": lambda lab: encoders_killed(lab, all_at_once=True),
    "encode-exception": lambda lab: with_failpoint(lab, "raise"),
    "poison-file": lambda lab: with_failpoint(lab, "crash"),
    "s3-outage": s3_outage,
    "s3-throttling": lambda lab: s3_flaky(
        lab,
        [
            FaultPlan(error_rate=0.15, short_read_rate=0.15),
            FaultPlan(error_rate=0.15, error_status=500),
        ],
        "throttling",
        "503 SlowDown + short reads, then 500s",
    ),
    "s3-unreadable": lambda lab: s3_flaky(
        lab,
        [
            FaultPlan(
                error_rate=1.0,
                error_status=500,
                paths=frozenset({"IM000003"}),
                methods=frozenset({"GET"}),
            )
        ],
        "unreadable",
        "one object answering 500 to every GET",
    ),
    "driver-kills": driver_kills,
    "fuzz": fuzz,
}


def markdown(results: dict[str, dict[str, Any]], sources: dict[str, bool]) -> str:
    lines = [
        "| scenario | fault injected | runs (archived / failed / done before) | final | "
        "invariants | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        runs = "; ".join(" / ".join(str(v) for v in run.values()) for run in result.get("runs", []))
        lines.append(
            f"| {name} | {result.get('injected', result.get('error', ''))} | {runs} | "
            f"{result.get('final', '')} | {'hold' if result.get('invariants_hold') else 'BROKEN'} "
            f"| {result.get('seconds', '')} |"
        )
    unchanged = sum(sources.values())
    lines += ["", f"Source exports byte-identical after all runs: {unchanged} of {len(sources)}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--fuzz-minutes", type=float, default=2.0)
    parser.add_argument("--only", help=f"comma-separated subset of {', '.join(SCENARIOS)}")
    parser.add_argument("--out", type=Path, default=Path("docs/bench/chaos"))
    args = parser.parse_args()
    chosen = args.only.split(",") if args.only else list(SCENARIOS)
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}")

    import logging

    from flows.migrate_command import prepare_prefect_environment

    prepare_prefect_environment()  # no telemetry, a writable home, a patient start-up timeout
    import ray
    from prefect.testing.utilities import prefect_test_harness

    from storage.bench import dummy_aws_credentials

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as scratch, dummy_aws_credentials():
        s3 = RestartableMotoServer().start()
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
        try:
            with prefect_test_harness(server_startup_timeout=180):
                from prefect.settings import PREFECT_API_URL

                lab = Lab(
                    Path(scratch),
                    s3,
                    str(PREFECT_API_URL.value()),
                    str(ray.get_runtime_context().gcs_address),
                    args.images,
                    args.kills,
                    args.fuzz_minutes,
                )
                for name in chosen:
                    print(f"== {name}", flush=True)
                    started = time.monotonic()
                    try:
                        results[name] = SCENARIOS[name](lab)
                    except Exception as error:  # a scenario that crashes is a finding
                        results[name] = {"error": f"{type(error).__name__}: {error}"[:300]}
                    results[name].setdefault("seconds", round(time.monotonic() - started, 1))
                    print(json.dumps(results[name], default=str), flush=True)
                sources = lab.sources_unchanged()
        finally:
            ray.shutdown()
            s3.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"scenarios": results, "sources_unchanged": sources, "images": args.images}
    (args.out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    text = markdown(results, sources)
    (args.out / "summary.md").write_text(text)
    print(text)
    broken = [n for n, r in results.items() if not r.get("invariants_hold")]
    sys.exit(1 if broken or not all(sources.values()) else 0)


if __name__ == "__main__":
    main()
