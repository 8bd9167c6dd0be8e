"""Rate-distortion benchmark of codecs on real images: run, measure, report.

``run`` measures points (real bytes, codec.metrics on decoded pixels); ``bdrate`` computes
Bjøntegaard delta rates; ``report`` writes CSV, Markdown and plots.
"""

from codec.bench.bdrate import bd_rate, ms_ssim_db
from codec.bench.report import PointLog, plot_curves, summary_markdown, write_csv, write_report
from codec.bench.run import BenchRow, Skip, load_images, run_bench

__all__ = [
    "BenchRow",
    "PointLog",
    "Skip",
    "bd_rate",
    "load_images",
    "ms_ssim_db",
    "plot_curves",
    "run_bench",
    "summary_markdown",
    "write_csv",
    "write_report",
]
