"""`yqpack build --data` / `sensitivity --data` on the real custom model (custom/asl: 26 letters, imgsz 416):
calibration and tuning images spread over the YAML's train split, the gate on its val split, the refusal of
train/val overlap, and the fallback from `mixed` to preset `auto` when the gate is missed (real Ultralytics,
ModelOpt, OpenVINO/onnxruntime; small subsets so each build takes seconds)."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from packager.calibration.train_split import spread_sample, train_tuning_images
from packager.cli.main import main
from packager.core.contracts import ConfigError, DataOverlapError
from packager.core.files import sha256_file
from packager.core.manifest import BuildManifest
from packager.datasets.data_yaml import read_data_yaml
from packager.pipeline.config import options_from_config
from packager.pipeline.gate import fallback_blocker
from packager.pipeline.run import validate_options

LETTERS = list(string.ascii_uppercase)
VAL_IMAGES = 16
SMALL = ["--imgsz", "416", "--calib-size", "8", "--max-tune-images", "8"]


@pytest.fixture(scope="module")
def asl(assets) -> Path:
    return assets / "custom" / "asl"


def write_yaml(folder: Path, asl: Path, train, val) -> Path:
    """A data.yaml over the asl dataset; a list of images becomes an image-list .txt beside it."""
    folder.mkdir(parents=True, exist_ok=True)

    def entry(name: str, value):
        if isinstance(value, str):
            return value
        listed = folder / f"{name}.txt"
        listed.write_text("".join(f"{path}\n" for path in value))
        return str(listed)

    path = folder / "data.yaml"
    path.write_text(yaml.safe_dump({"path": str(asl), "train": entry("train", train), "val": entry("val", val),
                                    "names": LETTERS}))
    return path


@pytest.fixture(scope="module")
def subset_yaml(asl, tmp_path_factory) -> Path:
    """The whole train split, and 16 val images spread over the val split."""
    val = spread_sample(sorted((asl / "valid" / "images").glob("*.jpg")), VAL_IMAGES, seed=5)
    return write_yaml(tmp_path_factory.mktemp("asl-subset"), asl, "train/images", val)


def yqpack(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# --- (c) spread sampling ---------------------------------------------------------------------------------------
def test_spread_sample_is_deterministic_and_one_per_run_of_the_sorted_list():
    files = [Path(f"img_{index:04d}.jpg") for index in range(103)]
    picked = spread_sample(files, 10, seed=0)
    assert picked == spread_sample(list(reversed(files)), 10, seed=0)  # the input order does not matter
    assert picked == sorted(picked) and len(set(picked)) == 10
    for run, path in enumerate(picked):  # exactly one pick in each tenth of the sorted list
        assert 103 * run // 10 <= files.index(path) < 103 * (run + 1) // 10
    assert picked != files[:10]
    assert spread_sample(files, 10, seed=1) != picked  # seeded, not fixed offsets
    assert spread_sample(files, 200) == files and spread_sample(files, None) == files


def test_calibration_and_tuning_are_spread_over_train_and_never_the_same(asl, subset_yaml):
    inputs = validate_options(options_from_config({"model": str(asl / "yolov8n-asl.pt"), "data": str(subset_yaml),
                                                   "calib_size": 26, "max_tune_images": 26, "out": "unused"}))
    plan = inputs.calibration
    train = read_data_yaml(subset_yaml).split_images("train")
    assert set(plan.calibration_files) <= set(train) and set(plan.tuning_files) <= set(train)
    assert not set(plan.calibration_files) & set(plan.tuning_files)
    assert list(plan.calibration_files) != train[:26]
    # custom/asl's sorted train split runs A..Z: a spread sample sees most letters, the first 26 files only 'A'-'B'
    assert len({path.name[0] for path in plan.calibration_files}) >= 20
    assert len(inputs.validation_files) == VAL_IMAGES and "[val]" in inputs.validation_description


def test_sensitivity_tuning_images_skip_the_calibration_images(subset_yaml):
    data = read_data_yaml(subset_yaml)
    train = data.split_images("train")
    calibration = {sha256_file(path): path.name for path in spread_sample(train, 8)}
    tuning = train_tuning_images(data, 8, calibration)
    assert len(tuning) == 8 and not {path.name for path in tuning} & set(calibration.values())


# --- option combinations, refused before any heavy work ---------------------------------------------------------
def _options(asl, **config):
    return options_from_config({"model": str(asl / "yolov8n-asl.pt"), "out": "unused", **config})


def test_data_options_that_do_not_go_together(asl, subset_yaml, assets, tmp_path):
    with pytest.raises(ConfigError, match="give one of the two"):
        validate_options(_options(asl, data=str(subset_yaml), val_images=str(assets / "coco" / "val2017"),
                                  val_annotations=str(assets / "coco" / "annotations" / "instances_val2017_128.json")))
    with pytest.raises(ConfigError, match="pass --data"):
        validate_options(_options(asl, calib_images=str(asl / "train" / "images"), split="test"))
    no_train = tmp_path / "no-train.yaml"
    no_train.write_text(yaml.safe_dump({"path": str(asl), "val": "valid/images", "names": LETTERS}))
    with pytest.raises(ConfigError, match="no 'train:' split .*--calib-images"):
        validate_options(_options(asl, data=str(no_train)))
    # --calib-images goes with --data: it calibrates, the YAML's split evaluates
    inputs = validate_options(_options(asl, data=str(no_train), calib_images=str(asl / "test" / "images"),
                                       calib_size=4))
    assert inputs.calibration.source == asl / "test" / "images" and inputs.calibration.split is None
    assert len(inputs.validation_files) == 144


def test_the_fallback_to_auto_needs_the_preset_left_open_and_tuning_images(asl):
    assert fallback_blocker(_options(asl), tuning_images=8) == ""
    assert "--preset mixed was chosen" in fallback_blocker(_options(asl, preset="mixed"), 8)
    assert "--dq-only" in fallback_blocker(_options(asl, dq_only=True), 8)
    assert "no tuning images" in fallback_blocker(_options(asl), 0)


# --- (b) train/val overlap ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("role, calib_size", [("calibration", 21), ("tuning", 1)])
def test_a_val_image_in_the_train_split_is_refused(asl, tmp_path, role, calib_size):
    val = sorted((asl / "valid" / "images").glob("*.jpg"))[:3]
    train = sorted((asl / "train" / "images").glob("*.jpg"))[:20] + [val[1]]
    # 21 calibration images take all of train; 1 leaves the val image to the tuning images (seeded, so fixed)
    assert (val[1] in spread_sample(train, calib_size)) == (role == "calibration")
    data = write_yaml(tmp_path / "leaky", asl, train, val)
    out = tmp_path / "out"
    result = yqpack("build", "--model", asl / "yolov8n-asl.pt", "--data", data, "--imgsz", "416",
                    "--calib-size", calib_size, "--out", out)
    assert result.exit_code == 1, result.output
    assert f"{val[1].name} = {role} image {val[1].name}" in result.output and "--allow-overlap" in result.output
    assert not out.exists()
    with pytest.raises(DataOverlapError):
        validate_options(_options(asl, data=str(data), calib_size=calib_size))


# --- (a) a real build from the dataset YAML -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def asl_build(asl, subset_yaml, tmp_path_factory):
    out = tmp_path_factory.mktemp("asl-build") / "asl"
    result = yqpack("build", "--model", asl / "yolov8n-asl.pt", "--data", subset_yaml, *SMALL,
                    "--min-map-ratio", "0.9", "--out", out)
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.mark.slow
def test_build_from_a_data_yaml_calibrates_on_train_and_gates_on_val(asl_build, subset_yaml):
    out, output = asl_build
    manifest = BuildManifest.load(out)
    assert list(manifest.model.class_names) == LETTERS
    train = read_data_yaml(subset_yaml).split_images("train")
    train_hashes = {sha256_file(path) for path in train}
    calibration = manifest.calibration
    assert calibration.count == 8 and set(calibration.image_sha256) <= train_hashes
    assert calibration.source == f"{subset_yaml} [train]" and "'train' images" in calibration.selection
    assert sorted(calibration.image_sha256.values()) != [path.name for path in train[:8]]
    assert manifest.evaluation.metrics["int8-fp32"].images == VAL_IMAGES
    assert manifest.evaluation.gate.passed and len(manifest.evaluation.attempts) == 1
    assert (manifest.config["data"], manifest.config["split"], manifest.config["preset"]) == (str(subset_yaml),
                                                                                              "val", None)
    printed = " ".join(output.split())  # rich wraps lines at the console's width
    assert f"Calibration: 8 of the {len(train)} 'train' images" in printed and "[val]: 16 images" in printed
    # the build's summary (a caption narrower than the path: folded inside it)
    assert f"calibrationon8imagesof{subset_yaml}[train]" in "".join(output.split())


# --- (d) mixed misses the gate: preset auto, then a kept failed build -----------------------------------------------
@pytest.mark.slow
def test_a_missed_gate_tries_auto_then_keeps_the_failed_build(asl, subset_yaml, tmp_path):
    out = tmp_path / "asl"
    # No INT8 model reaches 1.5 x FP32: mixed fails, the build re-quantizes with auto, gates again, fails.
    result = yqpack("build", "--model", asl / "yolov8n-asl.pt", "--data", subset_yaml, *SMALL,
                    "--min-map-ratio", "1.5", "--out", out)
    assert result.exit_code == 1, result.output
    error = result.output[result.output.index("Error: "):]
    assert "Preset mixed missed the gate" in result.output and "Auto preset: agreement target" in result.output
    assert "Tried preset mixed: int8-fp32 ratio" in error and "; preset auto: int8-fp32 ratio" in error
    for remedy in ("more validation images", "a lower --min-map-ratio", "a higher --auto-target than 0.97"):
        assert remedy in error
    kept = out.with_name("asl.failed-gate")
    assert f"kept in {kept}" in error and not out.exists()
    recorded = json.loads((kept / "manifest.json").read_text())["evaluation"]
    assert recorded["gate"]["passed"] is False
    assert [attempt["preset"] for attempt in recorded["attempts"]] == ["mixed", "auto"]
    assert all(not attempt["passed"] and attempt["gates"][0]["images"] == VAL_IMAGES
               for attempt in recorded["attempts"])
    manifest = BuildManifest.load(kept)
    assert manifest.quantization.preset == "auto" and manifest.quantization.auto is not None
    # auto tuned on train images that are not calibration images, never on the val images that gated it
    tuning = set(manifest.calibration.tuning_image_sha256)
    val = {sha256_file(path) for path in read_data_yaml(subset_yaml).split_images("val")}
    assert tuning and not tuning & val and not tuning & set(manifest.calibration.image_sha256)
    # its INT8 is not served: render refuses it, and serves the float precisions
    refused = yqpack("render", "--build", kept, "--repository", tmp_path / "repo", "--target", "local")
    assert refused.exit_code == 1 and "failed its accuracy gate (int8-fp32 ratio" in refused.output, refused.output
    served = yqpack("render", "--build", kept, "--repository", tmp_path / "repo", "--precisions", "fp32,fp16")
    assert served.exit_code == 0, served.output


# --- (e) sensitivity on the train split ----------------------------------------------------------------------------
@pytest.mark.slow
def test_sensitivity_from_a_data_yaml(asl_build, subset_yaml, tmp_path):
    out, _ = asl_build
    result = yqpack("sensitivity", "--build", out, "--data", subset_yaml, "--max-images", "4", "--refine", "0",
                    "--out", tmp_path / "sensitivity.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "sensitivity.json").read_text())
    train_names = {path.name for path in read_data_yaml(subset_yaml).split_images("train")}
    calibration_names = set(BuildManifest.load(out).calibration.image_sha256.values())
    assert report["images"] == 4 and set(report["image_files"]) <= train_names - calibration_names
    assert report["units"] and (tmp_path / "sensitivity.md").is_file()
    both = yqpack("sensitivity", "--build", out, "--data", subset_yaml, "--images", tmp_path)
    assert both.exit_code == 1 and "one of the two" in both.output
