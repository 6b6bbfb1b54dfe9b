"""The device check script (``make gpu-check``) in its tiny CPU mode: every stage runs
and writes its results, so the script a GPU session gets is known to work."""

from __future__ import annotations

import json

import pytest

from recon.g3r.checkpoint import load_checkpoint
from recon.gpu_check import main


@pytest.mark.slow
def test_gpu_check_tiny_mode_runs_every_stage(tmp_path):
    out = tmp_path / "out"
    assert main(["--out", str(out), "--tiny"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["mode"] == "tiny"
    stages = res["stages"]
    assert list(stages) == ["env", "finetune", "tests", "raster", "recon"]
    assert all(s["ok"] for s in stages.values()), stages
    assert stages["env"]["torch"]
    assert stages["tests"]["passed"]
    assert stages["raster"]["torch"]["forward_s"] > 0
    rows = {r["method"] for r in stages["recon"]["logs"][0]["rows"]}
    assert {"g3r", "g3r turbo", "adam 4", "adam at G3R's time",
            "adam at 10x G3R's time"} <= rows
    assert (out / "recon_psnr_vs_time.png").stat().st_size > 1000
    ck = load_checkpoint(out / "g3r_finetuned.safetensors")
    assert ck.sha256 == stages["finetune"]["sha256"]
    assert ck.info["iterations"] >= 1 and ck.info["train_config"]["init_from"]


def test_gpu_check_skips_what_the_time_budget_cannot_hold(tmp_path):
    """A budget too small for a stage skips it (recorded) instead of overrunning."""
    out = tmp_path / "out"
    assert main(["--out", str(out), "--tiny", "--stages", "env,recon",
                 "--time-budget-s", "30"]) == 1
    stages = json.loads((out / "results.json").read_text())["stages"]
    assert stages["env"]["ok"] and not stages["recon"]["ok"]
    assert "s left" in stages["recon"]["skipped"]


def test_gpu_check_refuses_unknown_stages(tmp_path):
    with pytest.raises(ValueError, match="unknown gpu-check stages"):
        main(["--out", str(tmp_path), "--tiny", "--stages", "env,warp"])
