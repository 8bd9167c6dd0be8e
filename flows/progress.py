"""Progress of a migration, for whoever watches: a rich bar on the command line, else nothing.

The flow reports to :func:`current`; the CLI installs a :class:`RichProgress` around the flow
with :func:`reporting`. Units are files of the export, so that the total is known from a plain
listing (run beside the scan): every listed file ends up archived, skipped, failed, already
done by an earlier run, or not DICOM.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

__all__ = ["NullProgress", "ProgressSink", "RichProgress", "current", "reporting"]


class ProgressSink:
    """Receives progress; this base class ignores it."""

    def set_total(self, files: int) -> None:
        """The export holds ``files`` files (known once the listing is done)."""

    def advance(self, files: int, source_bytes: int, counts: dict[str, int]) -> None:
        """``files`` more files are settled, ``source_bytes`` of them read; ``counts`` are
        the run's totals so far by outcome."""


NullProgress = ProgressSink
_CURRENT: ContextVar[ProgressSink | None] = ContextVar("radiarc_progress", default=None)


def current() -> ProgressSink:
    return _CURRENT.get() or ProgressSink()


@contextmanager
def reporting(sink: ProgressSink) -> Iterator[ProgressSink]:
    token = _CURRENT.set(sink)
    try:
        yield sink
    finally:
        _CURRENT.reset(token)


class _Throughput(ProgressColumn):
    """MB/s of source data read, from the task's ``source_bytes`` field."""

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        megabytes = task.fields.get("source_bytes", 0) / 1e6
        rate = megabytes / elapsed if elapsed > 0 else 0.0
        return Text(f"{rate:.2f} MB/s", style="progress.data.speed")


class RichProgress(ProgressSink):
    """A live bar: files settled of files listed (outcomes in the description), MB/s of
    source read, elapsed time and ETA."""

    def __init__(self, console: Console | None = None) -> None:
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(bar_width=16),
            MofNCompleteColumn(),
            _Throughput(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task: TaskID | None = None
        self.source_bytes = 0

    def __enter__(self) -> RichProgress:
        self.progress.start()
        self.task = self.progress.add_task("migrating", total=None, source_bytes=0)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def set_total(self, files: int) -> None:
        if self.task is not None:
            self.progress.update(self.task, total=files)

    def advance(self, files: int, source_bytes: int, counts: dict[str, int]) -> None:
        if self.task is None:
            return
        self.source_bytes += source_bytes
        description = ", ".join(f"{value} {name}" for name, value in counts.items() if value)
        self.progress.update(
            self.task,
            advance=files,
            source_bytes=self.source_bytes,
            description=description or "migrating",
        )
