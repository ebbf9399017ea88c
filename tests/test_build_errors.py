"""`yqpack build` mistakes: plain `Error: ...`, exit code != 0, and nothing half-written in --out."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from packager.cli.main import main


@pytest.fixture
def run(assets, tmp_path):
    def invoke(*args, model=None, out=None):
        out = out or tmp_path / "out"
        argv = ["build", "--model", str(model or assets / "weights" / "yolov8n.pt"), "--out", str(out), *map(str, args)]
        return CliRunner().invoke(main, argv), out

    return invoke


def assert_clean_failure(result, out, *fragments):
    assert result.exit_code != 0, result.output
    # Progress bars may precede it; the failure itself is one plain `Error:` line.
    assert any(line.startswith("Error: ") for line in result.output.splitlines()), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
    assert not out.exists(), f"{out} was created by a failed build"
    leftovers = [p.name for p in out.parent.iterdir() if ".partial-" in p.name]
    assert not leftovers, f"staging directories left behind: {leftovers}"


def test_no_calibration_source(run):
    result, out = run()
    assert_clean_failure(result, out, "--calib-images", "random data")


def test_calibration_folder_missing(run, tmp_path):
    result, out = run("--calib-images", tmp_path / "nope")
    assert_clean_failure(result, out, "not found", "nope")


def test_calibration_folder_empty(run, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    result, out = run("--calib-images", tmp_path / "empty")
    assert_clean_failure(result, out, "no images")


def test_calibration_folder_all_corrupt(run, tmp_path):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (corrupt / "b.png").write_bytes(b"")
    result, out = run("--calib-images", corrupt)
    assert_clean_failure(result, out, "could be decoded", "a.jpg")


def test_missing_model_file(run, assets, tmp_path):
    result, out = run("--calib-images", assets / "coco" / "calib2017", model=tmp_path / "missing.pt")
    assert_clean_failure(result, out, "model file not found", "missing.pt")


def test_unsupported_model_type(run, assets, tmp_path):
    (tmp_path / "model.tflite").write_bytes(b"x")
    result, out = run("--calib-images", assets / "coco" / "calib2017", model=tmp_path / "model.tflite")
    assert_clean_failure(result, out, ".pt")


@pytest.mark.parametrize("imgsz", ["641", "abc", "0", "640,480,320"])
def test_bad_imgsz(run, assets, imgsz):
    result, out = run("--calib-images", assets / "coco" / "calib2017", "--imgsz", imgsz)
    assert_clean_failure(result, out, "--imgsz")


def test_calibration_data_with_wrong_shape(run, tmp_path):
    np.save(tmp_path / "calib.npy", np.zeros((4, 3, 320, 320), np.float32))
    result, out = run("--calib-data", tmp_path / "calib.npy")
    assert_clean_failure(result, out, "320x320", "640x640")


def test_evaluation_needs_both_images_and_annotations(run, assets):
    result, out = run("--calib-images", assets / "coco" / "calib2017", "--val-images", assets / "coco" / "val2017")
    assert_clean_failure(result, out, "--val-annotations")


def test_foreign_out_directory_is_not_overwritten(run, assets, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.txt").write_text("keep me")
    result, _ = run("--calib-images", assets / "coco" / "calib2017", out=out)
    assert result.exit_code != 0 and "refusing to overwrite" in result.output
    assert (out / "thesis.txt").read_text() == "keep me"


def test_failed_rebuild_keeps_the_previous_build(run, tmp_path):
    out = tmp_path / "build"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "x.jpg").write_bytes(b"garbage")
    result, _ = run("--calib-images", corrupt, out=out)
    assert result.exit_code != 0 and "Error: " in result.output
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


@pytest.mark.slow
def test_failed_accuracy_gate_writes_nothing(run, assets, tmp_path):
    """A real (small) build whose evaluation misses an impossible gate: both numbers shown, --out untouched, the
    failed build kept beside it. `--preset mixed` chosen: no fallback to auto (tests/test_build_data.py has it)."""
    subset = tmp_path / "val"
    subset.mkdir()
    for path in sorted((assets / "coco" / "val2017").glob("*.jpg"))[:4]:
        (subset / path.name).symlink_to(path)
    result, out = run(
        "--calib-images", assets / "coco" / "calib2017", "--calib-size", 4, "--val-images", subset,
        "--val-annotations", assets / "coco" / "annotations" / "instances_val2017_128.json", "--min-map-ratio", 1.5,
        "--preset", "mixed",
    )
    assert_clean_failure(result, out, "INT8 accuracy gate failed", "vs fp32", "nothing was written",
                         "--preset auto, or leave --preset out", f"kept in {out}.failed-gate")


def test_calibration_skips_corrupt_images_by_name(assets, tmp_path):
    from packager.calibration.calibration import build_calibration

    folder = tmp_path / "mixed"
    folder.mkdir()
    good = sorted((assets / "coco" / "calib2017").glob("*.jpg"))[:2]
    for path in good:
        (folder / path.name).symlink_to(path)
    (folder / "000_broken.jpg").write_bytes(b"\xff\xd8 nope")
    result = build_calibration(folder, (320, 320), count=5, show_progress=False)
    assert result.count == 2 and result.skipped == ["000_broken.jpg"]
    assert result.data.shape == (2, 3, 320, 320) and 0.0 <= result.data.min() and result.data.max() <= 1.0


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_calibration_files_load_and_are_checked(tmp_path, suffix):
    from packager.calibration.calibration import load_calibration_file

    data = np.random.default_rng(0).random((3, 3, 64, 64), dtype=np.float32)
    path = tmp_path / f"calib{suffix}"
    np.save(path, data) if suffix == ".npy" else np.savez(path, images=data)
    np.testing.assert_array_equal(load_calibration_file(path, (64, 64)), data)
    data[0, 0, 0, 0] = np.nan
    np.save(path, data) if suffix == ".npy" else np.savez(path, images=data)
    with pytest.raises(ValueError, match="NaN"):
        load_calibration_file(path, (64, 64))
