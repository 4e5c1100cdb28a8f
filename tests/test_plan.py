"""The planner: groups, names, dependencies and order, from Frame records alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from stacker.config import Settings
from stacker.frames import Frame
from stacker.plan import cluster, make_plan

TS = "20250729_143022"


def frame(kind, exptime=None, i=0, shape=(10, 12), **kw) -> Frame:
    name = f"{kind}_{exptime}_{kw.get('filter')}_{kw.get('ccd_temp')}_{kw.get('gain')}_{i}.fits"
    return Frame(path=Path("/raw") / name, kind=kind, exptime=exptime, exptime_source="EXPTIME",
                 shape=shape, bitpix=16, bzero=32768.0, data_offset=2880, **kw)


def frames(kind, n, exptime=None, **kw) -> list[Frame]:
    return [frame(kind, exptime, i, **kw) for i in range(n)]


def ids(plan):
    return [j.id for j in plan.jobs]


def test_exposures_equal_within_tolerance_or_a_tenth_percent():
    assert Settings().exposures_match(300.0, 300.0012)
    assert Settings().exposures_match(300.0, 300.2)  # 0.1 % of 300 s
    assert not Settings().exposures_match(1.0, 1.05)
    assert Settings(exposure_tolerance=0.1).exposures_match(1.0, 1.05)


def test_cluster_is_single_linkage_on_sorted_values():
    assert cluster([5.0, 1.0, 5.001, 30.0, 1.0], lambda a, b: abs(a - b) < 0.01) == [
        [1, 4], [0, 2], [3]]


def test_one_bias_one_dark_per_exposure_one_flat_in_dependency_order():
    inv = (frames("flat", 5, 1.0, filter="L") + frames("dark", 5, 5.0) + frames("dark", 5, 1.0)
           + frames("bias", 5) + [frame("dark", 5.0004, 9)])
    plan = make_plan(inv, Settings(), TS)
    assert ids(plan) == ["bias", "dark_1.000s", "dark_5.000s", "flat_L_1.000s"]
    assert [len(j.frames) for j in plan.jobs] == [5, 5, 6, 5]
    names = [j.output_name for j in plan.jobs]
    assert names == [f"master_bias_{TS}.fits", f"master_dark_1.000s_{TS}.fits",
                     f"master_dark_5.000s_{TS}.fits", f"master_flat_L_1.000s_{TS}.fits"]
    flat = plan.jobs[-1]
    assert flat.depends_on == ("dark_1.000s",) and flat.calibration.kind == "dark"


def test_flat_without_a_dark_of_its_exposure_falls_back_to_the_bias_and_says_so():
    inv = frames("flat", 5, 2.0) + frames("dark", 5, 5.0) + frames("bias", 5)
    flat = make_plan(inv, Settings(), TS).jobs[-1]
    assert flat.depends_on == ("bias",)
    assert any("no master dark of 2.000s" in n for n in flat.notes)
    assert flat.output_name == f"master_flat_2.000s_{TS}.fits"  # no FILTER, no filter in name


def test_flat_with_nothing_to_subtract_is_refused_with_the_fix():
    plan = make_plan(frames("flat", 5, 2.0), Settings(), TS)
    assert plan.buildable() == []
    assert "no master dark of 2.000s and no master bias" in plan.jobs[0].refused


def test_flats_alone_build_the_dark_they_need_or_reuse_an_existing_master():
    inv = frames("flat", 5, 1.0) + frames("dark", 5, 1.0) + frames("dark", 5, 30.0)
    plan = make_plan(inv, Settings(), TS, kinds=["flat"])
    assert ids(plan) == ["dark_1.000s", "flat_1.000s"]  # not the 30 s dark
    assert "builds dark_1.000s" in plan.jobs[1].notes[0]
    existing = frame("dark", 1.0, 99)
    plan = make_plan(inv, Settings(), TS, kinds=["flat"], existing=[existing])
    assert ids(plan) == ["flat_1.000s"]
    assert plan.jobs[0].calibration.path == existing.path and plan.jobs[0].depends_on == ()


def test_a_dark_built_in_this_run_wins_over_an_existing_master():
    inv = frames("flat", 5, 1.0) + frames("dark", 5, 1.0)
    plan = make_plan(inv, Settings(), TS, existing=[frame("dark", 1.0, 99)])
    assert plan.jobs[-1].depends_on == ("dark_1.000s",)


def test_darks_split_by_temperature_gain_and_binning_with_tags_in_the_names():
    inv = (frames("dark", 4, 60.0, ccd_temp=-10.2) + frames("dark", 4, 60.0, ccd_temp=-9.9)
           + frames("dark", 4, 60.0, ccd_temp=0.1))
    plan = make_plan(inv, Settings(), TS)
    assert ids(plan) == ["dark_60.000s_+0C", "dark_60.000s_-10C"]
    assert [len(j.frames) for j in plan.jobs] == [4, 8]
    assert plan.jobs[1].output_name == f"master_dark_60.000s_-10C_{TS}.fits"
    plan = make_plan(frames("bias", 3, gain=0) + frames("bias", 3, gain=100), Settings(), TS)
    assert ids(plan) == ["bias_g0", "bias_g100"]


def test_flat_prefers_the_dark_with_its_gain():
    inv = (frames("dark", 3, 1.0, gain=0) + frames("dark", 3, 1.0, gain=100)
           + frames("flat", 3, 1.0, gain=100, filter="Ha"))
    flat = make_plan(inv, Settings(), TS).jobs[-1]
    assert flat.depends_on == ("dark_1.000s_g100",)


def test_min_frames_refuses_a_small_group_and_other_groups_go_on():
    inv = frames("dark", 2, 5.0) + frames("dark", 5, 10.0)
    plan = make_plan(inv, Settings(min_frames=3), TS)
    assert [j.id for j in plan.buildable()] == ["dark_10.000s"]
    assert "2 usable frames, min_frames is 3" in plan.jobs[0].refused


def test_odd_shapes_are_left_out_of_their_group_with_the_reason():
    inv = [*frames("bias", 4), frame("bias", None, 7, shape=(10, 13))]
    plan = make_plan(inv, Settings(), TS)
    assert len(plan.jobs[0].frames) == 4
    assert "shape 13x10 differs from its group's 12x10" in plan.left_out[0][1]


def test_filter_names_are_sanitized_in_file_names():
    plan = make_plan(frames("flat", 3, 1.0, filter="H-alpha 7nm/../x") + frames("bias", 3),
                     Settings(), TS)
    name = plan.jobs[-1].output_name
    assert "/" not in name and name.startswith("master_flat_H-alpha-7nm-..-x_1.000s")


@pytest.mark.parametrize("kinds", [["bias"], ["dark"], ["bias", "dark", "flat"]])
def test_describe_lists_every_job(kinds):
    inv = frames("bias", 3) + frames("dark", 3, 1.0) + frames("flat", 3, 1.0)
    plan = make_plan(inv, Settings(), TS, kinds=kinds)
    text = plan.describe()
    for job in plan.jobs:
        assert job.id in text and job.output_name in text


def test_temperature_tolerance_merges_or_splits_dark_groups():
    inv = frames("dark", 3, 60.0, ccd_temp=-10.0) + frames("dark", 3, 60.0, ccd_temp=-5.0)
    assert len(make_plan(inv, Settings(temperature_tolerance=2.0), TS).jobs) == 2
    assert len(make_plan(inv, Settings(temperature_tolerance=6.0), TS).jobs) == 1
