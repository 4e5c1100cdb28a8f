"""Tests for stacker.config: defaults, YAML loading, overrides, validation messages, sizes."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from stacker.config import (
    _CHECKS,
    KNOWN_KEYS,
    LOG_LEVELS,
    NORMALIZATION_METHODS,
    REJECTION_METHODS,
    SIGMA_CENTERS,
    SIGMA_STDDEVS,
    Settings,
    format_size,
    load_settings,
    parse_size,
)
from stacker.errors import ConfigError

SEED_YAML = """\
master_frames:
  output_dir: "master_frames"           # Output directory
  rejection_method: "sigma_clip"        # 'sigma_clip' or 'minmax'
  sigma_threshold: 3.0                  # Sigma threshold
  normalization_method: "mean"          # 'mean', 'median', 'max'
  quality_control: true                 # Enable quality control
  save_individual_masters: true         # Save individual masters
  create_master_bias: true              # Create master bias
  create_master_darks: true             # Create master darks
  create_master_flats: true             # Create master flats
"""

# The seed guide's table of defaults ("master_frames" is relative to where the run starts).
SEED_DEFAULTS = {
    "rejection_method": "sigma_clip",
    "sigma_threshold": 3.0,
    "normalization_method": "mean",
    "quality_control": True,
    "save_individual_masters": True,
    "create_master_bias": True,
    "create_master_darks": True,
    "create_master_flats": True,
}

# A value different from the default for every key, as written in YAML, and as stored.
NON_DEFAULTS = {
    "output_dir": ("/data/masters", Path("/data/masters")),
    "rejection_method": ("minmax", "minmax"),
    "sigma_threshold": (2.5, 2.5),
    "normalization_method": ("median", "median"),
    "quality_control": (False, False),
    "save_individual_masters": (False, False),
    "create_master_bias": (False, False),
    "create_master_darks": (False, False),
    "create_master_flats": (False, False),
    "bias_dir": ("/data/bias", Path("/data/bias")),
    "darks_dir": ("/data/darks", Path("/data/darks")),
    "flats_dir": ("/data/flats", Path("/data/flats")),
    "input_dir": ("/data/all", Path("/data/all")),
    "memory_limit": ("512MB", 512_000_000),
    "min_frames": (10, 10),
    "sigma_low": (4.0, 4.0),
    "sigma_high": (2.0, 2.0),
    "sigma_center": ("mean", "mean"),
    "sigma_stddev": ("mad_std", "mad_std"),
    "max_iterations": (5, 5),
    "nlow": (2, 2),
    "nhigh": (3, 3),
    "log_dir": ("/data/logs", Path("/data/logs")),
    "log_level": ("debug", "DEBUG"),
    "num_workers": (4, 4),
    "exposure_tolerance": (0.5, 0.5),
    "temperature_tolerance": (1, 1.0),
    "force": (True, True),
    "qc_outlier_sigma": (None, None),
    "qc_flat_max_level": (0.8, 0.8),
    "qc_saturated_fraction": (0.05, 0.05),
    "qc_min_finite_fraction": (1, 1.0),
    "qc_hot_sigma": (8, 8.0),
    "qc_low_pixel_level": (0.3, 0.3),
    "qc_dust_depth": (0.02, 0.02),
    "qc_egain": (1.5, 1.5),
    "scheduler": ("local:2", "local:2"),
}


def write_config(folder: Path, text: str, name: str = "config.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def error_of(config=None, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(config, overrides)
    return str(info.value)


# --------------------------------------------------------------------------- defaults


def test_every_field_has_a_check_and_known_keys_match_fields():
    names = tuple(f.name for f in dataclasses.fields(Settings))
    assert tuple(_CHECKS) == names == KNOWN_KEYS
    assert len(KNOWN_KEYS) == len(set(KNOWN_KEYS))


@pytest.mark.parametrize(("key", "value"), SEED_DEFAULTS.items())
def test_defaults_equal_seed_table(key, value):
    assert getattr(Settings(), key) == value


def test_default_output_dir_is_master_frames_in_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Settings().output_dir == tmp_path / "master_frames"
    assert load_settings().output_dir == tmp_path / "master_frames"


def test_defaults_of_added_keys():
    s = Settings()
    assert s.memory_limit == 2 * 1024**3
    assert (s.min_frames, s.nlow, s.nhigh) == (3, 1, 1)
    assert (s.sigma_low, s.sigma_high, s.max_iterations, s.num_workers) == (None,) * 4
    assert (s.sigma_center, s.sigma_stddev, s.log_level) == ("median", "std", "INFO")
    assert (s.exposure_tolerance, s.temperature_tolerance) == (0.01, 2.0)
    assert s.bias_dir is s.darks_dir is s.flats_dir is s.input_dir is s.log_dir is None


def test_seed_yaml_gives_defaults(tmp_path):
    path = write_config(tmp_path / "cfg", SEED_YAML)
    s = load_settings(path)
    assert s == Settings(output_dir=tmp_path / "cfg" / "master_frames")


def test_settings_is_frozen_and_picklable():
    s = Settings(sigma_threshold=2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.sigma_threshold = 4.0  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(s)) == s


# --------------------------------------------------------------------------- YAML and paths


def test_every_key_round_trips_from_yaml(tmp_path):
    assert set(NON_DEFAULTS) == set(KNOWN_KEYS)
    section = {key: written for key, (written, _) in NON_DEFAULTS.items()}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"master_frames": section}), encoding="utf-8")
    s = load_settings(path)
    for key, (_, stored) in NON_DEFAULTS.items():
        assert getattr(s, key) == stored, key
        assert getattr(s, key) != getattr(Settings(), key), key


def test_relative_paths_resolve_against_config_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    path = write_config(
        tmp_path / "cfg",
        """\
        master_frames:
          output_dir: out
          bias_dir: ../raw/bias
          darks_dir: ~/darks
          flats_dir: /abs/flats
          input_dir: ./mixed/
        """,
    )
    s = load_settings(path)
    assert s.output_dir == tmp_path / "cfg" / "out"
    assert s.bias_dir == tmp_path / "raw" / "bias"
    assert s.darks_dir == tmp_path / "home" / "darks"
    assert s.flats_dir == Path("/abs/flats")
    assert s.input_dir == tmp_path / "cfg" / "mixed"
    assert s.log_dir is None


def test_relative_config_path_and_defaults_use_cwd(tmp_path, monkeypatch):
    write_config(tmp_path / "cfg", "master_frames:\n  bias_dir: bias\n")
    monkeypatch.chdir(tmp_path)
    s = load_settings("cfg/config.yaml")
    assert s.bias_dir == tmp_path / "cfg" / "bias"
    assert s.output_dir == tmp_path / "master_frames"  # not written in the file: cwd


def test_mapping_paths_are_relative_to_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = load_settings({"master_frames": {"output_dir": "out", "log_dir": "../logs"}})
    assert s.output_dir == tmp_path / "out"
    assert s.log_dir == tmp_path.parent / "logs"
    assert all(p.is_absolute() for p in (s.output_dir, s.log_dir))


def test_other_top_level_keys_are_ignored_next_to_master_frames(tmp_path):
    path = write_config(
        tmp_path,
        """\
        telescope:
          focal_length: 800
        camera: {gain: 100}
        master_frames:
          sigma_threshold: 2.0
        """,
    )
    assert load_settings(path).sigma_threshold == 2.0


def test_flat_mapping_is_the_section_itself(tmp_path):
    assert load_settings({"rejection_method": "median"}).rejection_method == "median"
    path = write_config(tmp_path, "nlow: 2\nnhigh: 0\n")
    s = load_settings(path)
    assert (s.nlow, s.nhigh) == (2, 0)


def test_empty_section_and_empty_mapping_give_defaults(tmp_path):
    path = write_config(tmp_path, "master_frames:\n")
    assert load_settings(path) == Settings()
    assert load_settings({}) == Settings()


def test_yaml_null_means_until_converged_and_one_worker_per_cpu(tmp_path):
    path = write_config(tmp_path, "master_frames:\n  max_iterations: null\n  num_workers: ~\n")
    s = load_settings(path)
    assert s.max_iterations is None and s.num_workers is None
    assert s.resolved_num_workers == (os.cpu_count() or 1)
    assert Settings(num_workers=3).resolved_num_workers == 3


def test_yaml_booleans_and_numbers(tmp_path):
    path = write_config(
        tmp_path,
        """\
        master_frames:
          quality_control: no
          create_master_bias: False
          sigma_threshold: 3
          min_frames: 5.0
          memory_limit: 1073741824
        """,
    )
    s = load_settings(path)
    assert s.quality_control is False and s.create_master_bias is False
    assert s.sigma_threshold == 3.0 and isinstance(s.sigma_threshold, float)
    assert s.min_frames == 5 and isinstance(s.min_frames, int)
    assert s.memory_limit == 2**30


def test_choices_are_case_insensitive():
    s = Settings(rejection_method=" MinMax ", log_level="warning", sigma_stddev="MAD_STD")
    assert (s.rejection_method, s.log_level, s.sigma_stddev) == ("minmax", "WARNING", "mad_std")


# --------------------------------------------------------------------------- overrides


def test_overrides_win_only_when_not_none(tmp_path):
    path = write_config(
        tmp_path, "master_frames:\n  sigma_threshold: 2.0\n  rejection_method: minmax\n"
    )
    overrides = {"sigma_threshold": 4.0, "rejection_method": None, "normalization_method": None}
    s = load_settings(path, overrides)
    assert s.sigma_threshold == 4.0  # override > YAML
    assert s.rejection_method == "minmax"  # None: YAML stays
    assert s.normalization_method == "mean"  # None: default stays


def test_override_paths_are_relative_to_cwd(tmp_path, monkeypatch):
    path = write_config(tmp_path / "cfg", "master_frames:\n  output_dir: out\n")
    monkeypatch.chdir(tmp_path)
    s = load_settings(path, {"output_dir": "cli_out", "memory_limit": "1GiB"})
    assert s.output_dir == tmp_path / "cli_out"
    assert s.memory_limit == 2**30


def test_settings_input_is_returned_as_is_or_with_overrides():
    base = Settings(nlow=2)
    assert load_settings(base) is base
    assert load_settings(base, {"nlow": None}) is base
    changed = load_settings(base, {"nhigh": 4})
    assert (changed.nlow, changed.nhigh) == (2, 4)


def test_override_errors_name_the_key_without_a_file(tmp_path):
    path = write_config(tmp_path, "master_frames: {}\n")
    message = error_of(path, {"sigma_threshold": -1.0})
    assert message == "master_frames.sigma_threshold: -1.0 must be > 0; e.g. 3.0"
    message = error_of(None, {"sigma_treshold": 2.0})
    assert message == "unknown key master_frames.sigma_treshold; did you mean sigma_threshold?"


def test_replace_revalidates_and_applies_none():
    s = Settings(sigma_low=2.0)
    assert s.replace(sigma_low=None).sigma_low is None
    assert s.replace(log_level="error").log_level == "ERROR"
    with pytest.raises(ConfigError, match=r"^master_frames\.min_frames: 0 must be >= 1"):
        s.replace(min_frames=0)
    with pytest.raises(ConfigError, match=r"did you mean nlow\?"):
        s.replace(nlwo=2)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("typo", "suggestion"),
    [
        ("sigma_treshold", "sigma_threshold"),
        ("rejection", "rejection_method"),
        ("normalisation_method", "normalization_method"),
        ("create_master_dark", "create_master_darks"),
        ("memory", "memory_limit"),
        ("num_worker", "num_workers"),
        ("bias_folder", "bias_dir"),
    ],
)
def test_unknown_key_suggests_closest(typo, suggestion):
    message = error_of({"master_frames": {typo: 1}})
    assert message == f"unknown key master_frames.{typo}; did you mean {suggestion}?"


def test_unknown_key_without_close_match_lists_valid_keys():
    message = error_of({"master_frames": {"zzz": 1}})
    assert message.startswith("unknown key master_frames.zzz; valid keys: output_dir, ")
    assert message.endswith(KNOWN_KEYS[-1])


def test_several_unknown_keys_are_all_named(tmp_path):
    path = write_config(tmp_path, "master_frames:\n  sigma_treshold: 2\n  foo: 1\n  bar: 2\n")
    assert error_of(path) == (
        f"{path}: unknown key master_frames.sigma_treshold; did you mean sigma_threshold?"
        " (also unknown: foo, bar)"
    )


def test_flat_mapping_with_a_typo_reports_the_unknown_key():
    message = error_of({"output_dir": "x", "sigma_treshold": 2})
    assert message == "unknown key master_frames.sigma_treshold; did you mean sigma_threshold?"


def test_missing_section(tmp_path):
    path = write_config(tmp_path, "telescope:\n  focal_length: 800\n")
    assert error_of(path) == (
        f"{path}: no 'master_frames:' section (top-level keys: telescope);"
        " put the settings under master_frames:"
    )
    assert error_of({"master_frame": {}}) == (
        "no 'master_frames:' section; did you mean master_frames instead of master_frame?"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "the config is empty; expected a 'master_frames:' mapping"),
        ("- a\n- b\n", "expected a 'master_frames:' mapping at the top level, found list"),
        ("master_frames: 3\n", "master_frames: expected a mapping of settings, found 3"),
    ],
)
def test_bad_top_level_shapes(tmp_path, text, expected):
    path = write_config(tmp_path, text)
    assert error_of(path) == f"{path}: {expected}"


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.yaml"
    assert error_of(path) == f"config file not found: {path}"
    assert error_of(tmp_path) == f"config file {tmp_path} is a folder; give the path of a YAML file"


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write_config(tmp_path, "master_frames:\n  sigma_threshold: 3.0\n  bad: [1, 2\n")
    message = error_of(path)
    assert message.startswith(f"{path}:4:")
    assert "YAML syntax error" in message and "\n" not in message
    path = write_config(tmp_path, "master_frames:\n  a: b: c\n", name="two.yaml")
    assert error_of(path).startswith(f"{path}:2:")


def test_config_of_wrong_type():
    assert error_of(3.5) == "config must be a YAML file path or a mapping, not float"


SCHEDULER_HINT = ("write local:N (N worker processes on this machine), the address of a running "
                  "Dask scheduler such as tcp://host:8786, or null (threads on this machine)")
BAD_VALUES = [
    ("rejection_method", "kappa", "'kappa' is not one of sigma_clip, minmax, median, mean"),
    (
        "rejection_method",
        "sigmaclip",
        "'sigmaclip' is not one of sigma_clip, minmax, median, mean; did you mean sigma_clip?",
    ),
    ("rejection_method", 3, "3 is not one of sigma_clip, minmax, median, mean"),
    ("normalization_method", "mode", "'mode' is not one of mean, median, max"),
    ("sigma_center", "mode", "'mode' is not one of median, mean"),
    ("sigma_stddev", "var", "'var' is not one of std, mad_std"),
    ("log_level", "loud", "'loud' is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ("quality_control", "yes please", "'yes please' is not a boolean; write true or false"),
    ("create_master_flats", "false", "'false' is not a boolean; write true or false"),
    ("create_master_bias", 1, "1 is not a boolean; write true or false"),
    ("sigma_threshold", 0, "0 must be > 0; e.g. 3.0"),
    ("sigma_threshold", -1.5, "-1.5 must be > 0; e.g. 3.0"),
    ("sigma_threshold", "3", "'3' is not a number; e.g. 3.0"),
    ("sigma_threshold", float("nan"), "nan is not a number; e.g. 3.0"),
    ("sigma_threshold", True, "True is not a number; e.g. 3.0"),
    ("sigma_threshold", None, "None is not a number; e.g. 3.0"),
    ("sigma_low", 0.0, "0.0 must be > 0; e.g. 3.0, or null for sigma_threshold"),
    ("sigma_high", "x", "'x' is not a number; e.g. 3.0, or null for sigma_threshold"),
    ("min_frames", 0, "0 must be >= 1; e.g. 3"),
    ("min_frames", 2.5, "2.5 is not a whole number; e.g. 3"),
    ("nlow", -1, "-1 must be >= 0; e.g. 1"),
    ("nhigh", "1", "'1' is not a whole number; e.g. 1"),
    ("max_iterations", 0, "0 must be >= 1; e.g. 5, or null to iterate until converged"),
    ("num_workers", 0, "0 must be >= 1; e.g. 4, or null for one per CPU"),
    ("exposure_tolerance", -0.1, "-0.1 must be >= 0; e.g. 0.01 (seconds)"),
    ("temperature_tolerance", float("inf"), "inf is not a number; e.g. 2.0 (degrees C)"),
    ("scheduler", "local:0", "'local:0' is not a scheduler; " + SCHEDULER_HINT),
    ("scheduler", "http://host:8786", "'http://host:8786' is not a scheduler; " + SCHEDULER_HINT),
    ("output_dir", None, "None is not a folder path; write e.g. master_frames"),
    ("output_dir", "  ", "'  ' is not a folder path; write e.g. master_frames"),
    ("bias_dir", 5, "5 is not a folder path; write e.g. frames/bias, or null"),
    ("memory_limit", "lots", "'lots' is not a size; write e.g. 2GB, 512MB or 1.5GiB"),
    ("memory_limit", 0, "0 must be more than 0 bytes; write e.g. 2GB, 512MB or 1.5GiB"),
]


@pytest.mark.parametrize(("key", "value", "expected"), BAD_VALUES)
def test_bad_value_message_names_key_value_and_fix(key, value, expected):
    assert error_of({"master_frames": {key: value}}) == f"master_frames.{key}: {expected}"
    with pytest.raises(ConfigError) as info:
        Settings(**{key: value})
    assert str(info.value) == f"master_frames.{key}: {expected}"


def test_bad_value_in_file_is_prefixed_with_the_file(tmp_path):
    path = write_config(tmp_path, 'master_frames:\n  quality_control: "yes please"\n')
    assert error_of(path) == (
        f"{path}: master_frames.quality_control: 'yes please' is not a boolean; write true or false"
    )


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("text", "n_bytes"),
    [
        (1073741824, 2**30),
        ("4096", 4096),
        (" 4096 ", 4096),
        ("100B", 100),
        ("2GB", 2_000_000_000),
        ("2 GB", 2_000_000_000),
        ("2gb", 2_000_000_000),
        ("512MB", 512_000_000),
        ("64kB", 64_000),
        ("1TB", 10**12),
        ("1.5GiB", 3 * 2**29),
        ("2GiB", 2 * 2**30),
        ("2Gi", 2 * 2**30),
        ("800M", 800 * 2**20),
        ("2G", 2 * 2**30),
        ("2g", 2 * 2**30),
        ("16K", 16 * 1024),
        ("1T", 2**40),
        (".5GiB", 2**29),
        ("2e9", 2_000_000_000),
        ("2.5e9", 2_500_000_000),
        (2.5e9, 2_500_000_000),
        ("12345678901234567890", 12345678901234567890),
        ("1.0000001KiB", 1024),
    ],
)
def test_parse_size(text, n_bytes):
    assert parse_size(text) == n_bytes


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("lots", "is not a size"),
        ("", "is not a size"),
        ("GB", "is not a size"),
        ("2 G B", "is not a size"),
        ("1,5GB", "is not a size"),
        ("2XB", "has an unknown unit 'XB'"),
        ("2Gb/s", "is not a size"),
        ("0", "must be more than 0 bytes"),
        ("0GB", "must be more than 0 bytes"),
        ("-2GB", "must be more than 0 bytes"),
        ("0.1B", "must be more than 0 bytes"),
        (-5, "must be more than 0 bytes"),
        (True, "is not a size"),
        (None, "is not a size"),
        (float("nan"), "is not a size"),
        ([2], "is not a size"),
    ],
)
def test_parse_size_rejects_garbage(text, problem):
    with pytest.raises(ConfigError) as info:
        parse_size(text)
    message = str(info.value)
    assert message.startswith(f"memory_limit: {text!r} {problem}")
    assert "2GB" in message or "GiB" in message


def test_parse_size_unknown_unit_message():
    with pytest.raises(ConfigError) as info:
        parse_size("2XB", key="master_frames.memory_limit")
    assert str(info.value) == (
        "master_frames.memory_limit: '2XB' has an unknown unit 'XB'; use kB, MB, GB, TB"
        " (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)"
    )


@pytest.mark.parametrize(
    ("n_bytes", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (4096, "4.00 KiB"),
        (64_000, "64.00 kB"),
        (1_234_567, "1.23 MB"),
        (2 * 10**9, "2.00 GB"),
        (2 * 2**30, "2.00 GiB"),
        (3 * 2**29, "1.50 GiB"),
        (800 * 2**20, "800.00 MiB"),
        (10**12, "1.00 TB"),
        (2**50, "1024.00 TiB"),
    ],
)
def test_format_size(n_bytes, text):
    assert format_size(n_bytes) == text


@given(st.integers(min_value=1, max_value=2**50))
def test_format_size_parses_back_within_rounding(n_bytes):
    assert parse_size(format_size(n_bytes)) == pytest.approx(n_bytes, rel=5e-3)


# --------------------------------------------------------------------------- kernel options


def test_kernel_options_sigma_clip_defaults_to_threshold():
    s = Settings(sigma_threshold=2.5)
    assert s.kernel_options() == {
        "sigma_low": 2.5,
        "sigma_high": 2.5,
        "center": "median",
        "stddev": "std",
        "max_iterations": None,
    }


def test_kernel_options_sigma_clip_explicit():
    s = Settings(sigma_low=4, sigma_high=2, sigma_center="mean", sigma_stddev="mad_std",
                 max_iterations=1)  # fmt: skip
    assert s.kernel_options() == {
        "sigma_low": 4.0,
        "sigma_high": 2.0,
        "center": "mean",
        "stddev": "mad_std",
        "max_iterations": 1,
    }


@pytest.mark.parametrize(
    ("method", "options"),
    [("minmax", {"nlow": 2, "nhigh": 0}), ("median", {}), ("mean", {})],
)
def test_kernel_options_other_methods(method, options):
    assert Settings(rejection_method=method, nlow=2, nhigh=0).kernel_options() == options


# --------------------------------------------------------------------------- tolerances


def test_exposures_match_absolute_and_relative():
    s = Settings(exposure_tolerance=0.01)
    assert s.exposures_match(1.0, 1.009)
    assert not s.exposures_match(1.0, 1.02)
    assert s.exposures_match(300.0, 300.25)  # 0.1 % of 300 s
    assert not s.exposures_match(300.0, 301.0)
    assert Settings(temperature_tolerance=2).temperatures_match(-10.0, -8.0)
    assert not Settings(temperature_tolerance=2).temperatures_match(-10.0, -7.5)


# --------------------------------------------------------------------------- to_dict


def test_to_dict_is_json_friendly():
    s = Settings(bias_dir="/x/bias", memory_limit="1GB", sigma_low=2)
    d = s.to_dict()
    assert tuple(d) == KNOWN_KEYS
    assert d["bias_dir"] == "/x/bias" and d["memory_limit"] == 10**9 and d["sigma_low"] == 2.0
    assert json.loads(json.dumps(d)) == d
    assert load_settings(d) == s


def test_import_is_light():
    heavy = "{'numpy', 'yaml', 'dask', 'astropy'}"
    code = f"import sys, stacker.config; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- properties


def _any_case(options):
    return st.sampled_from(options).flatmap(lambda o: st.sampled_from([o, o.upper(), o.title()]))


_names = st.text(alphabet="abcxyz_-.0123456789", min_size=1, max_size=8).filter(
    lambda s: s not in (".", "..")
)
_dirs = st.lists(_names, min_size=1, max_size=3).map(lambda parts: os.path.join(*parts))
_positive = st.floats(min_value=1e-6, max_value=1e6) | st.integers(min_value=1, max_value=100)
_tolerance = st.floats(min_value=0, max_value=1e4) | st.integers(min_value=0, max_value=100)
_fractions = st.floats(min_value=1e-6, max_value=1.0) | st.just(1)
_sizes = st.integers(min_value=1, max_value=2**45) | st.sampled_from(
    ["2GB", "512MB", "1.5GiB", "800M", "4096", "3 TiB"]
)

VALID_VALUES = {
    "output_dir": _dirs | _dirs.map(lambda p: "/" + p),
    "rejection_method": _any_case(REJECTION_METHODS),
    "sigma_threshold": _positive,
    "normalization_method": _any_case(NORMALIZATION_METHODS),
    "quality_control": st.booleans(),
    "save_individual_masters": st.booleans(),
    "create_master_bias": st.booleans(),
    "create_master_darks": st.booleans(),
    "create_master_flats": st.booleans(),
    "bias_dir": st.none() | _dirs,
    "darks_dir": st.none() | _dirs,
    "flats_dir": st.none() | _dirs,
    "input_dir": st.none() | _dirs,
    "memory_limit": _sizes,
    "min_frames": st.integers(min_value=1, max_value=1000),
    "sigma_low": st.none() | _positive,
    "sigma_high": st.none() | _positive,
    "sigma_center": _any_case(SIGMA_CENTERS),
    "sigma_stddev": _any_case(SIGMA_STDDEVS),
    "max_iterations": st.none() | st.integers(min_value=1, max_value=100),
    "nlow": st.integers(min_value=0, max_value=50),
    "nhigh": st.integers(min_value=0, max_value=50),
    "log_dir": st.none() | _dirs,
    "log_level": _any_case(LOG_LEVELS),
    "num_workers": st.none() | st.integers(min_value=1, max_value=256),
    "exposure_tolerance": _tolerance,
    "temperature_tolerance": _tolerance,
    "force": st.booleans(),
    "qc_outlier_sigma": st.none() | _positive,
    "qc_flat_max_level": _fractions,
    "qc_saturated_fraction": _fractions,
    "qc_min_finite_fraction": _fractions,
    "qc_hot_sigma": _positive,
    "qc_low_pixel_level": _fractions,
    "qc_dust_depth": _fractions,
    "qc_egain": st.none() | _positive,
    "scheduler": st.none() | st.integers(1, 64).map("local:{}".format)
    | st.sampled_from(["tcp://127.0.0.1:8786", "tls://scheduler.example.org:8786",
                       "ucx://10.0.0.1:13337"]),
}


@pytest.mark.parametrize(("key", "value"), [("qc_flat_max_level", 1.5), ("qc_dust_depth", 0),
                                            ("qc_low_pixel_level", "half")])
def test_qc_fractions_must_be_in_0_1(key, value):
    assert error_of({"master_frames": {key: value}}).startswith(
        f"master_frames.{key}: {value!r} is not a fraction in (0, 1]")


def test_property_strategies_cover_every_key():
    assert set(VALID_VALUES) == set(KNOWN_KEYS)


@settings(max_examples=200, deadline=None)
@given(st.fixed_dictionaries({}, optional=VALID_VALUES))
def test_any_valid_combination_builds_and_round_trips(values):
    out = Path(values.get("output_dir", "master_frames")).resolve()
    inputs = [values.get(k) for k in ("bias_dir", "darks_dir", "flats_dir", "input_dir")]
    if any(d is not None and out.is_relative_to(Path(d).resolve()) for d in inputs):
        with pytest.raises(ConfigError, match="is inside"):
            Settings(**values)
        return
    s = Settings(**values)
    assert load_settings(s.to_dict()) == s
    assert load_settings({"master_frames": s.to_dict()}) == s
    # Through YAML text too: what a provenance dump written to disk gives back.
    dumped = yaml.safe_load(yaml.safe_dump({"master_frames": s.to_dict()}))
    assert load_settings(dumped) == s
    assert s.replace() == s


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(KNOWN_KEYS),
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),
        st.text(max_size=10),
        st.lists(st.integers(), max_size=2),
        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    ),
)
@example("output_dir", "\x00")  # a NUL byte: no path can hold it (os raises ValueError)
@example("bias_dir", "/")  # the default output folder is inside it: the error names both keys
def test_any_value_builds_or_raises_config_error_naming_the_key(key, value):
    try:
        Settings(**{key: value})
    except ConfigError as exc:
        if "is inside" in str(exc):
            assert f"master_frames.{key} " in str(exc) and "output_dir" in str(exc)
        else:
            assert str(exc).startswith(f"master_frames.{key}: ")
        assert "\n" not in str(exc)


def test_yaml_file_round_trip_of_a_full_settings():
    s = Settings(**{key: written for key, (written, _) in NON_DEFAULTS.items()})
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "dump.yaml"
        path.write_text(yaml.safe_dump({"master_frames": s.to_dict()}), encoding="utf-8")
        assert load_settings(path) == s


def test_the_shipped_config_file_is_every_default():
    shipped = Path(__file__).resolve().parents[1] / "configs" / "master_frames.yaml"
    settings = load_settings(shipped)
    section = yaml.safe_load(shipped.read_text())["master_frames"]
    assert set(section) == set(KNOWN_KEYS)  # every key is documented there
    defaults = Settings()
    for key in KNOWN_KEYS:
        if key != "output_dir":  # relative to the file's folder
            assert getattr(settings, key) == getattr(defaults, key), key


@pytest.mark.parametrize(("written", "stored"), [
    (None, None), ("threads", None), (" Threads ", None), ("local:1", "local:1"),
    ("LOCAL:04", "local:4"), ("tcp://127.0.0.1:8786", "tcp://127.0.0.1:8786"),
    ("tls://scheduler.example.org:8786", "tls://scheduler.example.org:8786"),
])
def test_scheduler_values(written, stored):
    assert Settings(scheduler=written).scheduler == stored


def test_a_typed_scheduler_flag_overrides_the_yaml_even_back_to_threads():
    config = {"master_frames": {"scheduler": "tcp://10.0.0.5:8786"}}
    assert load_settings(config, {"scheduler": "local:2"}).scheduler == "local:2"
    assert load_settings(config, {"scheduler": "threads"}).scheduler is None
    assert load_settings(config, {"scheduler": None}).scheduler == "tcp://10.0.0.5:8786"
