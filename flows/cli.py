"""The ``radiarc`` command line: one typer app, one small function per command.

Commands are thin: they parse arguments, call library code in codec/ or storage/, and print.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="radiarc",
    help="Radiarc: X-ray archives in zarr, compressed by a learned RNN-Conv codec.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """Radiarc: X-ray archives in zarr, compressed by a learned RNN-Conv codec."""


if __name__ == "__main__":
    app()
