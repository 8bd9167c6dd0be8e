"""One report from several ``radiarc bench`` runs, on the images they have in common.

    python -m codec.bench.merge POINTS.csv... --out DIR [--reference jpeg2000]

For a run on a subset of images with other codecs (a slow codec, say) beside a full run:
means and BD-rates are then over the same images. Writes points.csv, summary.md and plots.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from codec.bench.report import merge_runs, read_csv, write_report


def main(argv: list[str] | None = None) -> None:
    """Merge the points of several runs and write their report."""
    parser = argparse.ArgumentParser(
        description="Merge the points.csv of several radiarc bench runs (on their common "
        "images) into one report: points.csv, summary.md and plots."
    )
    parser.add_argument("points", nargs="+", type=Path, help="points.csv files of bench runs")
    parser.add_argument("--out", type=Path, required=True, help="folder for the merged report")
    parser.add_argument("--reference", default="jpeg2000", help="codec BD-rates are against")
    args = parser.parse_args(argv)
    rows = merge_runs([read_csv(path) for path in args.points])
    if not rows:
        parser.error("the runs have no image in common")
    print(write_report(rows, [], args.out, args.reference))


if __name__ == "__main__":
    main()
