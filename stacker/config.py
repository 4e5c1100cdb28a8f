"""Settings: YAML file + command-line overrides -> one frozen, validated `Settings`.

Precedence is defaults < YAML < overrides (flags the user typed). Nothing downstream reads
YAML or flags again; every other module receives a `Settings`.

File layout
-----------
Settings live under a top-level ``master_frames:`` mapping, as in the seed guide. The file may
be part of a bigger system configuration: when ``master_frames:`` is present, every other
top-level key is ignored. A mapping *without* ``master_frames:`` is taken as the section itself
when at least one of its keys is a known setting (unknown keys in it are then reported with
the closest valid key); otherwise it is an error.

Paths
-----
Relative paths written in a config file are relative to that file's folder, so a config works
from any working directory. Relative paths given in a mapping, as overrides (CLI flags) or as
defaults (``output_dir: master_frames``) are relative to the current working directory. ``~``
is expanded. A `Settings` holds absolute paths only, so dask workers started in another folder
and the provenance headers see the same paths.

Sizes
-----
``memory_limit`` accepts a number of bytes or a string: ``kB``, ``MB``, ``GB``, ``TB`` are powers
of 1000 (SI, as disk makers and dask write them); ``KiB``, ``MiB``, ``GiB``, ``TiB`` (and ``Ki``,
``Mi``, ``Gi``, ``Ti``) are powers of 1024. A bare letter (``K``, ``M``, ``G``, ``T``) is binary, as
in ``docker -m 2g``, ``java -Xmx2g`` and ``free -g``, because memory is sold in binary units.
Units are case-insensitive (``mb`` means megabytes; there are no bits here).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from stacker.errors import ConfigError

__all__ = [
    "KNOWN_KEYS",
    "LOG_LEVELS",
    "NORMALIZATION_METHODS",
    "REJECTION_METHODS",
    "SCHEDULER_SCHEMES",
    "SECTION",
    "SIGMA_CENTERS",
    "SIGMA_STDDEVS",
    "Settings",
    "format_size",
    "load_settings",
    "parse_size",
]

SECTION = "master_frames"
REJECTION_METHODS = ("sigma_clip", "minmax", "median", "mean")
NORMALIZATION_METHODS = ("mean", "median", "max")
SIGMA_CENTERS = ("median", "mean")
SIGMA_STDDEVS = ("std", "mad_std")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: Protocols of a dask.distributed scheduler address (``tcp://host:8786``).
SCHEDULER_SCHEMES = ("tcp", "tls", "ucx")

_SIZE_HINT = "write e.g. 2GB, 512MB or 1.5GiB"
_SIZE_RE = re.compile(
    r"^\s*(?P<number>[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*(?P<unit>[A-Za-z]*)\s*$"
)
_SIZE_UNITS = {
    "": 1, "b": 1, "byte": 1, "bytes": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 2**10, "ki": 2**10, "kib": 2**10,
    "m": 2**20, "mi": 2**20, "mib": 2**20,
    "g": 2**30, "gi": 2**30, "gib": 2**30,
    "t": 2**40, "ti": 2**40, "tib": 2**40,
}  # fmt: skip

Check = Callable[[str, Any], Any]


# --------------------------------------------------------------------------- sizes


def parse_size(text: str | int, *, key: str = "memory_limit") -> int:
    """Parse a memory size into a number of bytes.

    Parameters
    ----------
    text : str or int
        Bytes as a number (``1073741824``, ``"4096"``) or a number with a unit (``"2GB"``,
        ``"2 GB"``, ``"512MB"``, ``"1.5GiB"``, ``"800M"``). ``kB/MB/GB/TB`` are powers of 1000;
        ``KiB/MiB/GiB/TiB`` and the bare letters ``K/M/G/T`` are powers of 1024.
    key : str
        The key path named in error messages.

    Returns
    -------
    int
        The size in bytes, rounded to the nearest byte; always > 0.

    Raises
    ------
    ConfigError
        For zero, negative, non-finite or unparsable sizes and unknown units.
    """
    if isinstance(text, bool):
        raise ConfigError(f"{key}: {text!r} is not a size; {_SIZE_HINT}")
    if isinstance(text, numbers.Integral):
        amount = Fraction(int(text))
    elif isinstance(text, numbers.Real):
        if not math.isfinite(text):
            raise ConfigError(f"{key}: {text!r} is not a size; {_SIZE_HINT}")
        amount = Fraction(float(text))
    elif isinstance(text, str):
        amount = _parse_size_text(text, key)
    else:
        raise ConfigError(f"{key}: {text!r} is not a size; {_SIZE_HINT}")
    n_bytes = round(amount)
    if n_bytes <= 0:
        raise ConfigError(f"{key}: {text!r} must be more than 0 bytes; {_SIZE_HINT}")
    return n_bytes


def _parse_size_text(text: str, key: str) -> Fraction:
    match = _SIZE_RE.match(text)
    if match is None:
        raise ConfigError(f"{key}: {text!r} is not a size; {_SIZE_HINT}")
    unit = match["unit"]
    factor = _SIZE_UNITS.get(unit.lower())
    if factor is None:
        raise ConfigError(
            f"{key}: {text!r} has an unknown unit {unit!r}; use kB, MB, GB, TB (powers of 1000)"
            " or KiB, MiB, GiB, TiB (powers of 1024)"
        )
    # Fraction keeps "1.5GiB" and "4096" exact; a float would round large byte counts.
    return Fraction(match["number"]) * factor


def format_size(n_bytes: int) -> str:
    """Format a number of bytes for people, e.g. ``"2.00 GB"`` or ``"2.00 GiB"``.

    Whole numbers of MiB (or KiB below 1 MiB) print in binary units and everything else in
    decimal units, so a size typed as ``2GiB`` or ``2GB`` prints back the way it was typed, and
    the text can be parsed again with `parse_size`.
    """
    n_bytes = int(n_bytes)
    binary = n_bytes % (2**20 if abs(n_bytes) >= 2**20 else 2**10) == 0
    if binary:
        base, units = 1024, ("KiB", "MiB", "GiB", "TiB")
    else:
        base, units = 1000, ("kB", "MB", "GB", "TB")
    if abs(n_bytes) < base:
        return f"{n_bytes} B"
    value, exponent = float(n_bytes), 0
    while abs(value) >= base and exponent < len(units):
        value /= base
        exponent += 1
    return f"{value:.2f} {units[exponent - 1]}"


# --------------------------------------------------------------------------- value checks
# Each check takes the key path (for messages) and a raw value, and returns the normalized value.


def _suggest(word: str, choices: Any) -> str | None:
    import difflib  # lazy: only needed on the error path

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return close[0] if close else None


def _choice(options: tuple[str, ...], *, upper: bool = False) -> Check:
    def check(path: str, value: Any) -> str:
        if isinstance(value, str):
            norm = value.strip().upper() if upper else value.strip().lower()
            if norm in options:
                return norm
            near = _suggest(norm, options)
            if near is not None:
                message = f"{path}: {value!r} is not one of {', '.join(options)}"
                raise ConfigError(f"{message}; did you mean {near}?")
        raise ConfigError(f"{path}: {value!r} is not one of {', '.join(options)}")

    return check


def _boolean(path: str, value: Any) -> bool:
    # Only real YAML booleans: a quoted "false" would be truthy if we let it through.
    if not isinstance(value, bool):
        raise ConfigError(f"{path}: {value!r} is not a boolean; write true or false")
    return value


def _number(minimum: float, *, strict: bool, hint: str, optional: bool = False) -> Check:
    bound = f"> {minimum:g}" if strict else f">= {minimum:g}"

    def check(path: str, value: Any) -> float | None:
        if value is None and optional:
            return None
        real = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if not real or not math.isfinite(value):
            raise ConfigError(f"{path}: {value!r} is not a number; {hint}")
        if not (value > minimum if strict else value >= minimum):
            raise ConfigError(f"{path}: {value!r} must be {bound}; {hint}")
        return float(value)

    return check


def _fraction(*, hint: str) -> Check:
    def check(path: str, value: Any) -> float:
        real = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if not real or not math.isfinite(value) or not 0 < value <= 1:
            raise ConfigError(f"{path}: {value!r} is not a fraction in (0, 1]; {hint}")
        return float(value)

    return check


def _integer(minimum: int, *, hint: str, optional: bool = False) -> Check:
    def check(path: str, value: Any) -> int | None:
        if value is None and optional:
            return None
        whole = isinstance(value, numbers.Integral) or (
            isinstance(value, float) and value.is_integer()
        )
        if isinstance(value, bool) or not whole:
            raise ConfigError(f"{path}: {value!r} is not a whole number; {hint}")
        if value < minimum:
            raise ConfigError(f"{path}: {value!r} must be >= {minimum}; {hint}")
        return int(value)

    return check


def _path(*, example: str, optional: bool = False) -> Check:
    def check(path: str, value: Any) -> Path | None:
        if value is None and optional:
            return None
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str) or not value.strip() or "\x00" in value:
            fix = f"write e.g. {example}" + (", or null" if optional else "")
            raise ConfigError(f"{path}: {value!r} is not a folder path; {fix}")
        # abspath (not resolve): normalizes '..' without following symlinks the user chose.
        return Path(os.path.abspath(os.path.expanduser(value)))

    return check


def _size(path: str, value: Any) -> int:
    return parse_size(value, key=path)


_SCHEDULER_HINT = ("write local:N (N worker processes on this machine), the address of a running "
                   "Dask scheduler such as tcp://host:8786, or null (threads on this machine)")
_ADDRESS_RE = re.compile(rf"^(?:{'|'.join(SCHEDULER_SCHEMES)})://[^\s/]+$", re.IGNORECASE)


def _scheduler(path: str, value: Any) -> str | None:
    # Only the form is checked here: whether a scheduler listens is known when connecting.
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == "threads":  # lets a typed flag undo a scheduler set in the YAML
            return None
        local = re.fullmatch(r"local:(\d+)", text, re.IGNORECASE)
        if local is not None and int(local[1]) >= 1:
            return f"local:{int(local[1])}"
        if _ADDRESS_RE.match(text):
            return text
    raise ConfigError(f"{path}: {value!r} is not a scheduler; {_SCHEDULER_HINT}")


_SIGMA_HINT = "e.g. 3.0, or null for sigma_threshold"
# One check per field; Settings.__post_init__ runs them all (a test pins that none is missing).
_CHECKS: dict[str, Check] = {
    "output_dir": _path(example="master_frames"),
    "rejection_method": _choice(REJECTION_METHODS),
    "sigma_threshold": _number(0, strict=True, hint="e.g. 3.0"),
    "normalization_method": _choice(NORMALIZATION_METHODS),
    "quality_control": _boolean,
    "save_individual_masters": _boolean,
    "create_master_bias": _boolean,
    "create_master_darks": _boolean,
    "create_master_flats": _boolean,
    "bias_dir": _path(example="frames/bias", optional=True),
    "darks_dir": _path(example="frames/darks", optional=True),
    "flats_dir": _path(example="frames/flats", optional=True),
    "input_dir": _path(example="frames", optional=True),
    "memory_limit": _size,
    "min_frames": _integer(1, hint="e.g. 3"),
    "sigma_low": _number(0, strict=True, optional=True, hint=_SIGMA_HINT),
    "sigma_high": _number(0, strict=True, optional=True, hint=_SIGMA_HINT),
    "sigma_center": _choice(SIGMA_CENTERS),
    "sigma_stddev": _choice(SIGMA_STDDEVS),
    "max_iterations": _integer(1, optional=True, hint="e.g. 5, or null to iterate until converged"),
    "nlow": _integer(0, hint="e.g. 1"),
    "nhigh": _integer(0, hint="e.g. 1"),
    "log_dir": _path(example="logs", optional=True),
    "log_level": _choice(LOG_LEVELS, upper=True),
    "num_workers": _integer(1, optional=True, hint="e.g. 4, or null for one per CPU"),
    "exposure_tolerance": _number(0, strict=False, hint="e.g. 0.01 (seconds)"),
    "temperature_tolerance": _number(0, strict=False, hint="e.g. 2.0 (degrees C)"),
    "force": _boolean,
    "qc_outlier_sigma": _number(0, strict=True, optional=True,
                                hint="e.g. 5.0, or null to keep outlier frames"),
    "qc_flat_max_level": _fraction(hint="e.g. 0.7 (of full scale)"),
    "qc_saturated_fraction": _fraction(hint="e.g. 0.01"),
    "qc_min_finite_fraction": _fraction(hint="e.g. 0.5"),
    "qc_hot_sigma": _number(0, strict=True, hint="e.g. 5.0"),
    "qc_low_pixel_level": _fraction(hint="e.g. 0.5 (of the local flat level)"),
    "qc_dust_depth": _fraction(hint="e.g. 0.01 (1 % dimmer than the smooth flat)"),
    "qc_egain": _number(0, strict=True, optional=True,
                        hint="e.g. 1.0 (e-/ADU), or null to use the EGAIN header"),
    "scheduler": _scheduler,
}


# --------------------------------------------------------------------------- Settings


@dataclass(frozen=True)
class Settings:
    """All options of a run, validated once; frozen, picklable and safe to share.

    Attributes
    ----------
    output_dir : Path
        Where masters are written (default ``master_frames``).
    rejection_method : str
        ``sigma_clip`` (default), ``minmax``, ``median`` or ``mean``.
    sigma_threshold : float
        Clipping threshold in units of the spread (default 3.0, > 0).
    normalization_method : str
        How a master flat is scaled to 1: ``mean`` (default), ``median`` or ``max``.
    quality_control, save_individual_masters : bool
        Seed switches, both true by default.
    create_master_bias, create_master_darks, create_master_flats : bool
        Which kinds of master to build (all true by default).
    bias_dir, darks_dir, flats_dir, input_dir : Path or None
        Input folders; ``input_dir`` holds mixed frames sorted by their IMAGETYP header.
    memory_limit : int
        Memory budget in bytes (default 2 GiB); see `parse_size` for the accepted text.
    min_frames : int
        Fewest frames a master may be built from (default 3, >= 1).
    sigma_low, sigma_high : float or None
        Separate low/high thresholds; None (default) means `sigma_threshold`.
    sigma_center : str
        Centre of the clip: ``median`` (default, robust) or ``mean`` (the seed's).
    sigma_stddev : str
        Spread of the clip: ``std`` (default) or ``mad_std``.
    max_iterations : int or None
        Clipping iterations; None (default) iterates until nothing more is rejected.
    nlow, nhigh : int
        Values dropped at each end by ``minmax`` (default 1 each, >= 0).
    log_dir : Path or None
        Folder of the log file (master_frames_YYYYMMDD.log); None means `output_dir`.
    log_level : str
        DEBUG, INFO (default), WARNING, ERROR or CRITICAL; stored upper case.
    num_workers : int or None
        Parallel tasks; None (default) means one per CPU (`resolved_num_workers`).
    exposure_tolerance : float
        Seconds; two exposures are equal when ``|a - b| <= max(tol, 1e-3 * max(a, b))``.
    temperature_tolerance : float
        Degrees C; two sensor temperatures are equal when ``|a - b| <= tol``.
    force : bool
        Rebuild every master even when one with the same inputs and settings (the same
        fingerprint, card STKFP) is already in `output_dir` (default false: skip it).
    qc_outlier_sigma : float or None
        Robust z-score above which a frame's level, noise or (flats) shape departs from its
        group and the frame is left out (default 5.0); None keeps outliers.
    qc_flat_max_level : float
        A flat whose level is above this fraction of full scale is left out (default 0.7).
    qc_saturated_fraction : float
        A flat with more than this fraction of pixels at full scale is left out (0.01).
    qc_min_finite_fraction : float
        A frame with fewer finite (not NaN/inf) pixels than this is left out (0.5).
    qc_hot_sigma : float
        A dark pixel this many sigma above its neighbours is hot (default 5.0).
    qc_low_pixel_level : float
        A flat pixel below this fraction of its neighbours is dead or low (default 0.5).
    qc_dust_depth : float
        A shadow this much dimmer than the smooth flat is reported as dust (0.01).
    qc_egain : float or None
        Conversion gain in e-/ADU for metrics in electrons; None reads EGAIN from the
        frames (GAIN is a camera setting, not e-/ADU, so it is not used).
    scheduler : str or None
        Where masters are built: None (default, also written ``threads``) on this machine's
        threads; ``local:N`` on a `distributed.LocalCluster` of N worker processes; or the
        address of a running Dask scheduler (``tcp://host:8786``, ``tls://``, ``ucx://``),
        whose workers must see the input and output paths (`stacker.cluster`).

    Notes
    -----
    Constructing a `Settings` validates and normalizes every field (numbers to float/int,
    choices to their canonical case, paths to absolute `Path`, sizes to bytes); a bad value
    raises `ConfigError` naming ``master_frames.<key>``, the value and the fix.
    """

    output_dir: Path = field(default=Path("master_frames"))
    rejection_method: str = "sigma_clip"
    sigma_threshold: float = 3.0
    normalization_method: str = "mean"
    quality_control: bool = True
    save_individual_masters: bool = True
    create_master_bias: bool = True
    create_master_darks: bool = True
    create_master_flats: bool = True
    bias_dir: Path | None = None
    darks_dir: Path | None = None
    flats_dir: Path | None = None
    input_dir: Path | None = None
    memory_limit: int = 2 * 1024**3
    min_frames: int = 3
    sigma_low: float | None = None
    sigma_high: float | None = None
    sigma_center: str = "median"
    sigma_stddev: str = "std"
    max_iterations: int | None = None
    nlow: int = 1
    nhigh: int = 1
    log_dir: Path | None = None
    log_level: str = "INFO"
    num_workers: int | None = None
    exposure_tolerance: float = 0.01
    temperature_tolerance: float = 2.0
    force: bool = False
    qc_outlier_sigma: float | None = 5.0
    qc_flat_max_level: float = 0.7
    qc_saturated_fraction: float = 0.01
    qc_min_finite_fraction: float = 0.5
    qc_hot_sigma: float = 5.0
    qc_low_pixel_level: float = 0.5
    qc_dust_depth: float = 0.01
    qc_egain: float | None = None
    scheduler: str | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = _CHECKS[f.name](f"{SECTION}.{f.name}", getattr(self, f.name))
            object.__setattr__(self, f.name, value)  # frozen: the only place fields are set
        self._check_output_outside_inputs()

    def _check_output_outside_inputs(self) -> None:
        # Input folders are searched recursively: masters written inside one would be read
        # back as frames by the next run.
        out = self.output_dir.resolve()
        for key in ("bias_dir", "darks_dir", "flats_dir", "input_dir"):
            folder = getattr(self, key)
            if folder is not None and out.is_relative_to(folder.resolve()):
                raise ConfigError(
                    f"{SECTION}.output_dir {self.output_dir} is inside {SECTION}.{key} "
                    f"{folder}: its masters would be read as input frames; choose an "
                    "output folder outside the input folders")

    def kernel_options(self) -> dict[str, Any]:
        """Keyword options for ``kernels.make_kernel(self.rejection_method, **options)``.

        ``sigma_clip``: sigma_low, sigma_high (each `sigma_threshold` when None), center,
        stddev, max_iterations. ``minmax``: nlow, nhigh. ``median`` and ``mean``: none.
        """
        if self.rejection_method == "sigma_clip":
            return {
                "sigma_low": self.sigma_threshold if self.sigma_low is None else self.sigma_low,
                "sigma_high": self.sigma_threshold if self.sigma_high is None else self.sigma_high,
                "center": self.sigma_center,
                "stddev": self.sigma_stddev,
                "max_iterations": self.max_iterations,
            }
        if self.rejection_method == "minmax":
            return {"nlow": self.nlow, "nhigh": self.nhigh}
        return {}

    def replace(self, **changes: Any) -> Settings:
        """Return a copy with `changes` applied and validated again.

        Unlike `load_settings` overrides, a None value here is applied (e.g. ``sigma_low=None``).
        """
        _check_keys(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """All settings as JSON-friendly values: paths as strings, `memory_limit` in bytes.

        The result is a valid input of `load_settings` and gives back an equal `Settings`.
        """
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @property
    def resolved_num_workers(self) -> int:
        """`num_workers`, or the number of CPUs when it is None."""
        return self.num_workers or os.cpu_count() or 1

    def exposures_match(self, a: float, b: float) -> bool:
        """True when exposures `a` and `b` (seconds) belong to the same master dark."""
        return abs(a - b) <= max(self.exposure_tolerance, 1e-3 * max(abs(a), abs(b)))

    def temperatures_match(self, a: float, b: float) -> bool:
        """True when sensor temperatures `a` and `b` (degrees C) are within tolerance."""
        return abs(a - b) <= self.temperature_tolerance


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


KNOWN_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Settings))
_PATH_KEYS = ("output_dir", "bias_dir", "darks_dir", "flats_dir", "input_dir", "log_dir")


def _check_keys(mapping: Mapping[Any, Any]) -> None:
    unknown = [str(key) for key in mapping if key not in KNOWN_KEYS]
    if not unknown:
        return
    first = unknown[0]
    near = _suggest(first, KNOWN_KEYS)
    fix = f"did you mean {near}?" if near else f"valid keys: {', '.join(KNOWN_KEYS)}"
    more = f" (also unknown: {', '.join(unknown[1:])})" if len(unknown) > 1 else ""
    raise ConfigError(f"unknown key {SECTION}.{first}; {fix}{more}")


# --------------------------------------------------------------------------- loading


def load_settings(
    config: str | os.PathLike[str] | Mapping[str, Any] | Settings | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the run's `Settings`: defaults < config < overrides.

    Parameters
    ----------
    config : path, mapping, Settings or None
        A YAML file (settings under ``master_frames:``), a mapping shaped like the parsed YAML
        (or like the section itself), an existing `Settings` (used as is), or None for the
        defaults.
    overrides : mapping, optional
        Values from command-line flags; a key whose value is None was not typed by the user
        and does not override anything.

    Returns
    -------
    Settings

    Raises
    ------
    ConfigError
        Missing or unreadable file, YAML syntax error (with file and line), missing
        ``master_frames:`` section, unknown key (with the closest valid key) or bad value
        (with the key path, the value and the allowed values). Errors from a file start with
        its path.
    """
    if isinstance(config, Settings):
        settings = config
    elif config is None:
        settings = Settings()
    elif isinstance(config, Mapping):
        settings = _from_section(_find_section(config), base_dir=None)
    elif isinstance(config, (str, os.PathLike)):
        settings = _from_file(Path(config))
    else:
        raise ConfigError(
            f"config must be a YAML file path or a mapping, not {type(config).__name__}"
        )
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    return settings.replace(**given) if given else settings


def _from_file(path: Path) -> Settings:
    path = Path(os.path.abspath(os.path.expanduser(path)))
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder; give the path of a YAML file") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise ConfigError(f"cannot read config file {path}: {reason}") from None
    data = _parse_yaml(text, path)
    try:
        return _from_section(_find_section(data), base_dir=path.parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _parse_yaml(text: str, path: Path) -> Any:
    import yaml  # lazy: `stacker --help` must not pay for it

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else f"{path}"
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(
            f"{where}: YAML syntax error: {problem}; check indentation, colons and quotes"
        ) from None


def _find_section(data: Any) -> Mapping[Any, Any]:
    if data is None:
        raise ConfigError(f"the config is empty; expected a '{SECTION}:' mapping")
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"expected a '{SECTION}:' mapping at the top level, found {type(data).__name__}"
        )
    if SECTION in data:
        section = data[SECTION]
        if section is None:  # "master_frames:" with nothing under it: all defaults
            return {}
        if not isinstance(section, Mapping):
            raise ConfigError(f"{SECTION}: expected a mapping of settings, found {section!r}")
        return section
    if not data or any(key in KNOWN_KEYS for key in data):
        return data  # the section itself, e.g. a `Settings.to_dict()`
    for key in data:
        if _suggest(str(key), [SECTION]):
            raise ConfigError(f"no '{SECTION}:' section; did you mean {SECTION} instead of {key}?")
    found = ", ".join(str(key) for key in data)
    raise ConfigError(
        f"no '{SECTION}:' section (top-level keys: {found}); put the settings under {SECTION}:"
    )


def _from_section(section: Mapping[Any, Any], base_dir: Path | None) -> Settings:
    _check_keys(section)
    values = dict(section)
    if base_dir is not None:
        for key in _PATH_KEYS:
            value = values.get(key)
            if isinstance(value, str) and value.strip():
                values[key] = base_dir / Path(value).expanduser()  # absolute stays absolute
    return Settings(**values)
