"""The `stacker` command: a thin Typer layer over `stacker.api`.

Every user error leaves through one door (`_fail`): one line on stderr and an exit code
(1: some masters failed, 2: usage or configuration error); tracebacks only with --debug.
Flags override the YAML only when typed: their defaults are None and None is not applied.
"""

from __future__ import annotations

import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from stacker import __version__

app = typer.Typer(
    name="stacker",
    help="Master calibration frames (bias, darks, flats) for CMOS cameras, in bounded memory.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class Rejection(str, Enum):
    sigma_clip = "sigma_clip"
    minmax = "minmax"
    median = "median"
    mean = "mean"


class Normalization(str, Enum):
    mean = "mean"
    median = "median"
    max = "max"


class Level(str, Enum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"
    CRITICAL = "CRITICAL"


ConfigOpt = Annotated[Optional[Path], typer.Option(  # noqa: UP045 - typer needs Optional
    "--config", "-c", help="YAML file with a master_frames: section.", dir_okay=False)]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Debug logging and full tracebacks.")]
LevelOpt = Annotated[Optional[Level], typer.Option(  # noqa: UP045
    "--log-level", case_sensitive=False, help="Console logging level (default INFO).")]


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"stacker: error: {message}", err=True)
    return typer.Exit(code)


def _console_logging(level: str) -> None:
    logger = logging.getLogger("stacker")
    for h in list(logger.handlers):
        if getattr(h, "_stacker_console", False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)-7s %(message)s"))
    handler.setLevel(level)
    handler._stacker_console = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False


def _creator(config, overrides, debug, progress=None):
    from stacker.api import MasterFrameCreator
    from stacker.errors import StackerError

    try:
        return MasterFrameCreator(config, overrides=overrides, progress=progress)
    except StackerError as exc:
        if debug:
            raise
        raise _fail(str(exc), exc.exit_code) from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"stacker {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Master calibration frames (bias, darks, flats) for CMOS cameras, in bounded memory."""


@app.command()
def masters(
    config: ConfigOpt = None,
    darks_only: Annotated[bool, typer.Option("--darks-only", help="Create only master darks.")]
    = False,
    flats_only: Annotated[bool, typer.Option(
        "--flats-only", help="Create only master flats (reuses master darks in output_dir).")]
    = False,
    rejection_method: Annotated[Optional[Rejection], typer.Option(  # noqa: UP045
        "--rejection-method", help="Frame rejection method.")] = None,
    sigma_threshold: Annotated[Optional[float], typer.Option(  # noqa: UP045
        "--sigma-threshold", help="Sigma threshold for rejection (low and high).")] = None,
    normalization_method: Annotated[Optional[Normalization], typer.Option(  # noqa: UP045
        "--normalization-method", help="Normalization method for flats.")] = None,
    memory_limit: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--memory-limit", help="Memory budget, e.g. 2GB or 512MB.")] = None,
    output_dir: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        "--output-dir", "-o", help="Output folder (overrides master_frames.output_dir).")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Rebuild masters that are already up to date in the output folder.")]
    = False,
    scheduler: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--scheduler", metavar="ADDRESS",
        help="Build on Dask: local:N (N worker processes here) or a scheduler address "
             "(tcp://host:8786) whose workers see the same paths; 'threads' = this machine.")]
    = None,
    debug: DebugOpt = False,
    log_level: LevelOpt = None,
) -> None:
    """Create master frames as configured: bias, one dark per exposure, flats.

    Masters already in the output folder with the same inputs and settings are kept, not
    rebuilt (use --force). Exit codes: 0 every master built or up to date; 1 some masters
    failed (the others are kept); 2 usage or configuration error, no usable input, or the
    output folder is in use by another run.
    """
    if darks_only and flats_only:
        raise _fail("--darks-only and --flats-only exclude each other; give one", EXIT_USAGE)
    level = "DEBUG" if debug else (log_level.value if log_level else None)
    overrides = {
        "rejection_method": rejection_method.value if rejection_method else None,
        "sigma_threshold": sigma_threshold,
        "normalization_method": normalization_method.value if normalization_method else None,
        "memory_limit": memory_limit,
        "output_dir": output_dir.resolve() if output_dir else None,
        "log_level": level,
        "force": True if force else None,
        "scheduler": scheduler,
    }
    with _Progress() as progress:
        creator = _creator(config, overrides, debug, progress)
        _console_logging(creator.settings.log_level)
        progress.enabled = creator.settings.log_level != "DEBUG"
        if darks_only:
            status = creator.create_master_darks()
        elif flats_only:
            status = creator.create_master_flats()
        else:
            status = creator.create_all_master_frames()
    _finish(status)


def _finish(status) -> None:
    if status.success:
        for path in status.data:
            typer.echo(path)
        return
    code = status.details.get("exit_code", EXIT_FAILED)
    raise _fail(status.message, code)


@app.command()
def plan(
    config: ConfigOpt = None,
    darks_only: Annotated[bool, typer.Option("--darks-only")] = False,
    flats_only: Annotated[bool, typer.Option("--flats-only")] = False,
    debug: DebugOpt = False,
) -> None:
    """Print the plan (groups, frame counts, dependencies, output names); reads no pixels."""
    from stacker.errors import StackerError

    creator = _creator(config, {}, debug)
    s = creator.settings
    if darks_only:
        kinds = ["dark"]
    elif flats_only:
        kinds = ["flat"]
    else:
        kinds = [k for k, on in (("bias", s.create_master_bias), ("dark", s.create_master_darks),
                                 ("flat", s.create_master_flats)) if on]
    try:
        the_plan = creator.plan(kinds)
    except StackerError as exc:
        if debug:
            raise
        raise _fail(str(exc), exc.exit_code) from None
    from stacker.engine import up_to_date

    current = {job_id: existing.path for job_id, existing in up_to_date(the_plan, s).items()}
    typer.echo(the_plan.describe(current))


@app.command()
def simulate(
    out: Annotated[Path, typer.Argument(help="Folder to write the calibration set into.")],
    width: Annotated[int, typer.Option(help="Frame width in pixels.")] = 384,
    height: Annotated[int, typer.Option(help="Frame height in pixels.")] = 256,
    n_bias: Annotated[int, typer.Option(help="Bias frames.")] = 20,
    n_darks: Annotated[int, typer.Option(help="Dark frames per exposure.")] = 15,
    n_flats: Annotated[int, typer.Option(help="Flat frames per filter.")] = 15,
    exposures: Annotated[str, typer.Option(help="Dark exposures in s, comma separated.")]
    = "1,5,30",
    flat_exposure: Annotated[float, typer.Option(help="Flat exposure in s.")] = 1.0,
    filters: Annotated[str, typer.Option(help="Flat filters, comma separated.")] = "L",
    layout: Annotated[str, typer.Option(help="'folders' (bias/, darks/, flats/) or 'flat' "
                                              "(one folder sorted by IMAGETYP).")] = "folders",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write a realistic synthetic CMOS calibration set and its ground truth."""
    from stacker.simulate import CameraModel, SimulationSpec
    from stacker.simulate import simulate as run

    try:
        spec = SimulationSpec(
            camera=CameraModel(shape=(height, width)), n_bias=n_bias, n_darks=n_darks,
            n_flats=n_flats, dark_exposures=tuple(float(e) for e in exposures.split(",")),
            flat_exposure=flat_exposure, flat_filters=tuple(f.strip() for f in filters.split(",")),
            layout=layout, seed=seed)
    except ValueError as exc:
        raise _fail(str(exc), EXIT_USAGE) from None
    run(out, spec)
    typer.echo(f"wrote a simulated calibration set and its truth to {out}")


@app.command()
def demo(
    folder: Annotated[Path, typer.Argument(help="Folder for the demo set and masters.")]
    = Path("demo"),
) -> None:
    """Simulate a small calibration set and build every master from it."""
    from stacker.demo import run_demo

    _console_logging("INFO")
    code = run_demo(folder, echo=typer.echo)
    raise typer.Exit(code)


@app.command()
def report(
    output_dir: Annotated[Path, typer.Argument(help="Output folder holding report.json.")],
) -> None:
    """Regenerate report.html from report.json and the masters in OUTPUT_DIR."""
    from stacker.report import regenerate

    try:
        path = regenerate(output_dir)
    except (ValueError, OSError) as exc:
        raise _fail(str(exc), EXIT_USAGE) from None
    typer.echo(path)


@app.command()
def inspect(
    files: Annotated[list[Path], typer.Argument(help="FITS frames or masters.")],
) -> None:
    """Print each file's header summary and statistics (masters: their stacker cards)."""
    from stacker.inspect import describe

    failed = False
    for path in files:
        try:
            typer.echo(describe(path))
        except (ValueError, OSError) as exc:
            typer.echo(f"stacker: error: {path}: {exc}", err=True)
            failed = True
    if failed:
        raise typer.Exit(EXIT_USAGE)


class _Progress:
    """A rich progress bar per master on a terminal; silent otherwise (the log says enough)."""

    def __init__(self) -> None:
        self.enabled = True
        self.bar = None
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> _Progress:
        if sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TimeElapsedColumn

            self.bar = Progress("[progress.description]{task.description}", BarColumn(),
                                "{task.percentage:>3.0f}%", TimeElapsedColumn(),
                                transient=False)
            self.bar.start()
        return self

    def __call__(self, job_id: str, done: int, total: int) -> None:
        if self.bar is None or not self.enabled:
            return
        if job_id not in self.tasks:
            self.tasks[job_id] = self.bar.add_task(job_id, total=total)
        self.bar.update(self.tasks[job_id], completed=done, total=total)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
