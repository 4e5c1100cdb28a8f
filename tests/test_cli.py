"""The `stacker` command, run as a user runs it: a real process, real files, exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest
from astropy.io import fits
from helpers import config_file, run_stacker

from stacker.simulate import CameraModel, SimulationSpec, simulate


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cliraw")
    simulate(folder, SimulationSpec(camera=CameraModel(shape=(24, 32)), n_bias=6,
                                    dark_exposures=(1.0, 5.0), n_darks=6, n_flats=6, seed=5))
    return folder


def write_config(tmp_path: Path, raw: Path, **keys) -> Path:
    return config_file(tmp_path, raw, "out", name="config.yaml", **keys)


def header(tmp_path: Path, pattern: str) -> fits.Header:
    return fits.getheader(next((tmp_path / "out").glob(pattern)))


def test_masters_builds_everything_and_prints_the_files(tmp_path, raw):
    cfg = write_config(tmp_path, raw)
    run = run_stacker("masters", "--config", str(cfg))
    assert run.returncode == 0, run.stderr
    printed = run.stdout.split()
    assert len(printed) == 4 and all(Path(p).exists() for p in printed)
    names = sorted(Path(p).name.rsplit("_", 2)[0] for p in printed)
    assert names == ["master_bias", "master_dark_1.000s", "master_dark_5.000s",
                     "master_flat_L_1.000s"]
    assert list((tmp_path / "out").glob("master_frames_*.log"))  # relative to the config


def test_flags_override_the_yaml_only_when_typed(tmp_path, raw):
    cfg = write_config(tmp_path, raw, sigma_threshold=2.5, rejection_method="sigma_clip")
    assert run_stacker("masters", "--config", str(cfg), "--darks-only").returncode == 0
    assert header(tmp_path, "master_dark_1.000s_*")["SIGLOW"] == 2.5
    for p in (tmp_path / "out").glob("*.fits"):
        p.unlink()
    run = run_stacker("masters", "--config", str(cfg), "--darks-only", "--sigma-threshold", "4",
                  "--rejection-method", "minmax")
    assert run.returncode == 0, run.stderr
    h = header(tmp_path, "master_dark_1.000s_*")
    assert h["COMBMETH"] == "minmax" and "SIGLOW" not in h


def test_darks_only_and_flats_only(tmp_path, raw):
    cfg = write_config(tmp_path, raw)
    assert run_stacker("masters", "-c", str(cfg), "--darks-only").returncode == 0
    out = tmp_path / "out"
    assert sorted(p.name.split("_")[1] for p in out.glob("master_*.fits")) == ["dark", "dark"]
    assert len(list(out.glob("bad_pixel_mask_*.fits"))) == 1  # hot pixels of the darks
    run = run_stacker("masters", "-c", str(cfg), "--flats-only", "--normalization-method", "max")
    assert run.returncode == 0, run.stderr
    assert len(list(out.glob("master_dark_*"))) == 2  # reused, not rebuilt
    h = header(tmp_path, "master_flat_*")
    assert h["NORMMETH"] == "max" and h["DATAMAX"] == pytest.approx(1.0)


def test_memory_limit_flag(tmp_path, raw):
    cfg = write_config(tmp_path, raw)
    run = run_stacker("masters", "-c", str(cfg), "--memory-limit", "1kB")
    assert run.returncode == 2
    assert "cannot hold one row" in run.stderr and "1.00 kB" in run.stderr


def test_configuration_errors_are_one_line_with_exit_2(tmp_path, raw):
    cfg = write_config(tmp_path, raw, sigma_treshold=3)
    run = run_stacker("masters", "--config", str(cfg))
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "did you mean sigma_threshold" in lines[0]
    assert "Traceback" not in run.stderr
    run = run_stacker("masters", "--config", str(tmp_path / "missing.yaml"))
    assert run.returncode == 2 and "missing.yaml" in run.stderr
    run = run_stacker("masters", "--config", str(cfg), "--rejection-method", "kappa")
    assert run.returncode == 2 and "kappa" in run.stderr


def test_a_master_that_cannot_be_built_exits_1_and_keeps_the_others(tmp_path, raw):
    cfg = write_config(tmp_path, raw, bias_dir=None, darks_dir=str(raw / "darks" / "5s"))
    run = run_stacker("masters", "--config", str(cfg))
    assert run.returncode == 1
    assert "no master dark of 1.000s and no master bias" in run.stderr
    assert len(list((tmp_path / "out").glob("master_dark_5.000s_*"))) == 1


def test_plan_prints_groups_without_building(tmp_path, raw):
    cfg = write_config(tmp_path, raw)
    run = run_stacker("plan", "--config", str(cfg))
    assert run.returncode == 0, run.stderr
    for text in ("bias", "dark_1.000s", "dark_5.000s", "flat_L_1.000s", "job dark_1.000s",
                 "master_flat_L_1.000s_"):
        assert text in run.stdout
    assert not list((tmp_path / "out").glob("*.fits"))


def test_no_input_files_names_the_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = tmp_path / "c.yaml"
    cfg.write_text("master_frames:\n  darks_dir: empty\n")
    run = run_stacker("masters", "--config", str(cfg), "--darks-only")
    assert run.returncode == 2
    assert "No input files found" in run.stderr and str(tmp_path / "empty") in run.stderr


def test_debug_shows_the_plan_and_strips(tmp_path, raw):
    cfg = write_config(tmp_path, raw)
    run = run_stacker("masters", "-c", str(cfg), "--darks-only", "--debug")
    assert run.returncode == 0
    assert "strips of" in run.stderr and "DEBUG" in run.stderr
    quiet = run_stacker("masters", "-c", str(cfg), "--darks-only", "--log-level", "ERROR")
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_simulate_and_version(tmp_path):
    run = run_stacker("simulate", str(tmp_path / "sim"), "--width", "16", "--height", "12",
                  "--n-bias", "3", "--n-darks", "3", "--n-flats", "3", "--exposures", "2")
    assert run.returncode == 0, run.stderr
    assert len(list((tmp_path / "sim").rglob("*.fits"))) == 9
    assert run_stacker("--version").stdout.startswith("stacker ")


def test_demo_builds_every_master_and_compares_with_truth(tmp_path):
    run = run_stacker("demo", "demo", cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "rms vs truth" in run.stdout
    assert len(list((tmp_path / "demo" / "master_frames").glob("master_*.fits"))) >= 4
