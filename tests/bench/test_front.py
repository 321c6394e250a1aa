"""The speed / quality front: which points dominate, and a whole run on a tiny model (eager engine) written as a
page with its picture."""

import json
import runpy
import sys
from pathlib import Path
from unittest import mock

import pytest

from sdtm_compile.bench.config import BenchConfig
from sdtm_compile.bench.front import front_points, run_front, write_front
from sdtm_compile.models import TINY_SD3

PNG = b"\x89PNG\r\n\x1a\n"


def _point(name, speedup, swd):
    return {"name": name, "speedup": speedup, "quality": {"swd_added": swd}}


@pytest.mark.unit
def test_a_point_is_on_the_front_unless_another_is_as_fast_and_better():
    points = front_points(
        [_point("slow-good", 1.1, 0.5), _point("fast-bad", 1.8, 9.0), _point("dominated", 1.05, 3.0),
         _point("fast-good", 1.5, 1.0)],
        "swd_added",
    )  # fmt: skip
    assert {p["name"]: p["on_front"] for p in points} == {
        "slow-good": True,
        "fast-bad": True,
        "dominated": False,
        "fast-good": True,
    }
    psnr = front_points([{"name": "a", "speedup": 1.2, "quality": {"psnr": 30.0}},
                         {"name": "b", "speedup": 1.3, "quality": {"psnr": 31.0}}], "psnr")  # fmt: skip
    assert [p["on_front"] for p in psnr] == [False, True]


@pytest.mark.unit
def test_a_front_run_times_measures_and_writes_its_page(tmp_path):
    config = BenchConfig(model="tiny-sd3", steps=3, engine="eager", sweep_runs=1, warmup=1, cold_caches=False)
    report = run_front(config, samples=2, batch=2, only=("sdtm", "sdtm[staggered]", "fbcache", "sdtm+fusion+fbcache"))
    names = {p["name"] for p in report["points"]}
    assert names == {"eager", "inductor", "sdtm", "sdtm[staggered]", "fbcache", "sdtm+fusion+fbcache"}
    points = {p["name"]: p for p in report["points"]}
    # state: the step cache's two [B, N, C] residuals; cache fusion adds K = 2 x blocks more (attn and ff)
    residuals = points["fbcache"]["state_mib"]
    assert points["sdtm"]["state_mib"] == 0.0 and residuals > 0
    assert points["sdtm+fusion+fbcache"]["state_mib"] == pytest.approx(residuals * (1 + TINY_SD3.num_layers))
    fused = points["sdtm+fusion+fbcache"]["steps"]
    assert fused["unmerged"] == 1 and fused["merged"] + fused["skipped"] == 2  # step 0 protected, never skipped
    assert points["inductor"]["speedup"] == 1.0
    assert points["sdtm"]["flop_ratio"] > points["sdtm[staggered]"]["flop_ratio"] > 1.0
    assert points["sdtm"]["steps"] == {"merged": 3, "unmerged": 0, "skipped": 0}
    assert points["eager"]["quality"]["psnr"] == float("inf")  # random weights: the paired measure only
    assert 10 < points["sdtm"]["quality"]["psnr"] < 200
    assert report["settings"]["front_measure"] == "psnr"
    out = write_front(report, tmp_path / "front")
    assert (out / "front.png").read_bytes()[:8] == PNG
    assert json.loads((out / "front.json").read_text())["kind"] == "front"
    page = (out / "index.md").read_text()
    assert "| sdtm[staggered] |" in page and "On the front (by psnr)" in page
    assert "2 images in each of 2 seed sets (seeds 0-1 and 2-3)" in page
    assert f"| {residuals:.1f} |" in page
    # scripts/front.py --redraw writes the page and picture again from front.json alone (a report from before the
    # state column gets it computed from each point's config)
    stored = json.loads((out / "front.json").read_text())
    for point in stored["points"]:
        del point["state_mib"]
    (out / "front.json").write_text(json.dumps(stored))
    (out / "index.md").unlink()
    (out / "front.png").unlink()
    script = str(Path(__file__).parents[2] / "scripts" / "front.py")
    for argv, code in (([str(out)], 0), ([str(tmp_path / "missing")], 2)):
        with mock.patch.object(sys, "argv", ["front.py", "--redraw", *argv]), pytest.raises(SystemExit) as exit_:
            runpy.run_path(script, run_name="__main__")
        assert exit_.value.code == code
    assert (out / "index.md").read_text() == page and (out / "front.png").read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match="unknown front configurations \\['nope'\\]"):
        run_front(config, samples=2, only=("nope",))
