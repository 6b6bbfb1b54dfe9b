"""The ``drivesplat`` CLI: synth -> inspect end to end, and clear errors on bad logs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "seq"
    res = runner.invoke(app, ["synth", str(out), "--seed", "5", "--frames", "4", "--width",
                              "64", "--height", "48", "--cameras", "front,front_left"])
    assert res.exit_code == 0, res.output
    return out


def test_synth_then_inspect_json_in_a_real_process(written):
    # The installed console script, as a user runs it.
    exe = Path(sys.executable).with_name("drivesplat")
    proc = subprocess.run([str(exe), "inspect", str(written), "--json"], capture_output=True,
                          text=True, check=True)
    info = json.loads(proc.stdout)
    assert info["format"] == "pandaset"
    assert info["frames"] == 4
    assert info["duration_s"] == pytest.approx(0.3)
    assert set(info["cameras"]) == {"front_camera", "front_left_camera"}
    cam = info["cameras"]["front_camera"]
    assert (cam["width"], cam["height"], cam["cx"], cam["cy"]) == (64, 48, 32.0, 24.0)
    assert cam["fx"] == pytest.approx(32 / 0.7002075382097097)  # tan(35 deg)
    assert info["lidar_points"] > 10_000
    assert info["tracks"] >= info["moving_tracks"] >= 0
    assert set(info) >= {"format", "frames", "duration_s", "cameras", "lidar_points", "tracks",
                         "moving_tracks"}


def test_inspect_human_readable(written):
    res = runner.invoke(app, ["inspect", str(written)])
    assert res.exit_code == 0
    assert "front_left_camera: 64x48" in res.output


def test_synth_refuses_to_overwrite(written):
    res = runner.invoke(app, ["synth", str(written), "--frames", "2", "--width", "32",
                              "--height", "24"])
    assert res.exit_code == 2
    assert "already exists" in res.output


def test_synth_rejects_unknown_camera(tmp_path):
    res = runner.invoke(app, ["synth", str(tmp_path / "x"), "--cameras", "roof"])
    assert res.exit_code == 2
    assert "unknown synthetic camera 'roof'" in res.output


@pytest.mark.parametrize("breakage", ["missing_dir", "missing_poses", "corrupt_pickle",
                                      "bad_jpeg", "frame_count", "nan_pose"])
def test_inspect_reports_bad_logs_and_exits_2(written, tmp_path, breakage):
    seq = tmp_path / "seq"
    shutil.copytree(written, seq)
    if breakage == "missing_dir":
        seq = tmp_path / "nowhere"
        culprit = "nowhere"
    elif breakage == "missing_poses":
        (seq / "camera" / "front_camera" / "poses.json").unlink()
        culprit = "poses.json"
    elif breakage == "corrupt_pickle":
        p = seq / "lidar" / "02.pkl.gz"
        p.write_bytes(p.read_bytes()[:100])
        culprit = "02.pkl.gz"
    elif breakage == "bad_jpeg":
        (seq / "camera" / "front_left_camera" / "01.jpg").write_bytes(b"not a jpeg at all")
        culprit = "01.jpg"
    elif breakage == "frame_count":
        p = seq / "camera" / "front_camera" / "timestamps.json"
        p.write_text(json.dumps(json.loads(p.read_text())[:-1]))
        culprit = "timestamps.json"
    else:
        p = seq / "lidar" / "poses.json"
        poses = json.loads(p.read_text())
        poses[1]["position"]["x"] = float("nan")
        p.write_text(json.dumps(poses))
        culprit = "lidar/poses.json"
    res = runner.invoke(app, ["inspect", str(seq), "--json"])
    assert res.exit_code == 2
    assert "error:" in res.output and culprit in res.output
    assert not res.output.lstrip().startswith("{")
