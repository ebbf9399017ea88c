"""The typed records of manifest.json (calibration, quantization, evaluation): round trips, an older manifest,
malformed records as ManifestErrors that name the key."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from packager.core.build_records import (
    CalibrationRecord,
    ConvCoverage,
    EvaluationRecord,
    QuantizationRecord,
    RatioInterval,
)
from packager.core.contracts import ManifestError
from packager.core.manifest import BuildManifest

# manifest.json of a yolov8n build (64 calibration images, preset mixed, FP8 twins, evaluated on val2017) written
# by yqpack before the records were typed: what every existing build directory holds.
BEFORE_RECORDS = Path(__file__).parent / "data" / "manifest_before_records.json"


@pytest.fixture
def old_manifest() -> dict:
    return json.loads(BEFORE_RECORDS.read_text())


def test_a_manifest_written_before_the_records_loads_typed(old_manifest):
    manifest = BuildManifest.from_dict(old_manifest)
    quantization, calibration, evaluation = manifest.quantization, manifest.calibration, manifest.evaluation
    assert quantization.preset == "mixed" and quantization.calibration_method == "max"
    assert quantization.excluded_ops == ("Add",) and quantization.quantized_nodes == 81
    assert quantization.mac_coverage("int8") == pytest.approx(old_manifest["quantization"]["int8_mac_coverage"],
                                                               abs=1e-5)
    assert quantization.mac_coverage("fp8") == pytest.approx(
        old_manifest["quantization"]["fp8"]["fp8_mac_coverage"], abs=1e-5)
    assert quantization.fp8.quantized_nodes == 67
    assert calibration.count == 64 and calibration.tuning.count == 64 and len(calibration.image_sha256) == 64
    assert set(calibration.used_images()) == {"calibration", "tuning"}
    fp32 = old_manifest["evaluation"]["fp32"]
    assert evaluation.metrics["fp32"].map50_95 == fp32["map50_95"] and evaluation.runtime == "onnxruntime"
    assert evaluation.map50_95("fp32", fp32["images"]) == fp32["map50_95"]
    assert evaluation.map50_95("fp32", fp32["images"] - 1) is None  # measured on other images: no reference
    assert [gate.variant for gate in evaluation.gates] == ["int8-fp32", "fp8-fp32"] and evaluation.min_ratio == 0.99
    assert evaluation.ratios_vs_fp32["int8-fp32"].high == old_manifest["evaluation"]["ratios_vs_fp32"]["int8-fp32"][
        "high"]


def test_writing_an_old_manifest_back_keeps_every_key_and_adds_the_format(old_manifest):
    written = BuildManifest.from_dict(old_manifest).to_dict()
    for record in ("quantization", "calibration", "evaluation"):
        assert written[record].pop("format") == 1
    assert written == old_manifest


def test_records_round_trip_and_unknown_keys_survive(old_manifest):
    data = copy.deepcopy(old_manifest)
    data["quantization"]["written_by_a_newer_yqpack"] = {"bias_correction": True}
    data["calibration"]["another_new_fact"] = [1, 2]
    manifest = BuildManifest.from_dict(data)
    assert BuildManifest.from_dict(manifest.to_dict()) == manifest
    assert manifest.to_dict()["quantization"]["written_by_a_newer_yqpack"] == {"bias_correction": True}
    for record, kind in ((manifest.quantization, QuantizationRecord), (manifest.calibration, CalibrationRecord),
                         (manifest.evaluation, EvaluationRecord)):
        assert kind.from_dict(json.loads(json.dumps(record.to_dict()))) == record
    coverage = manifest.quantization.conv_coverage["int8"]
    assert ConvCoverage.from_dict(coverage.as_dict()) == coverage
    interval = manifest.evaluation.ratios_vs_fp32["fp16"]
    assert RatioInterval.from_dict(interval.as_dict()) == interval


def test_a_build_without_evaluation_or_records_loads(old_manifest):
    data = copy.deepcopy(old_manifest)
    del data["evaluation"]
    data["quantization"] = data["calibration"] = {}  # what the repository index's model entry carries
    manifest = BuildManifest.from_dict(data)
    assert manifest.evaluation is None and manifest.quantization is None and manifest.calibration is None
    assert "evaluation" not in manifest.to_dict()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["quantization"].update(preset=3), "quantization: preset must be a string, got 3"),
        (lambda d: d["quantization"].pop("calibration_method"), "quantization lacks calibration_method"),
        (lambda d: d["quantization"].update(format=2), "quantization has format 2; this yqpack reads format 1"),
        (lambda d: d["quantization"].update(excluded_nodes="Add"), "excluded_nodes must be a list of strings"),
        (lambda d: d["quantization"]["conv_coverage"]["int8"].update(quantized_macs=[1]),
         "conv_coverage.int8: quantized_macs must be an object of integers"),
        (lambda d: d["quantization"]["fp8"].pop("quantized_nodes"), "quantization: fp8 lacks quantized_nodes"),
        (lambda d: d.update(quantization=[]), "quantization must be a JSON object, got list"),
        (lambda d: d["calibration"].pop("count"), "calibration lacks count"),
        (lambda d: d["calibration"].update(count="64"), "calibration: count must be an integer, got '64'"),
        (lambda d: d["calibration"]["tuning"].update(files=[1]), "tuning: files must be a list of strings"),
        (lambda d: d["evaluation"]["fp32"].update(map50_95="high"), "evaluation: fp32: map50_95 must be a number"),
        (lambda d: d["evaluation"]["fp16"].pop("images"), "evaluation: fp16 lacks images"),
        (lambda d: d["evaluation"].update(gates={}), "evaluation: gates must be a list"),
        (lambda d: d["evaluation"]["ratios_vs_fp32"]["fp16"].update(low=None), "ratios_vs_fp32.fp16: low must be"),
        (lambda d: d["evaluation"]["gate"].update(min_ratio="0.99"), "gate.min_ratio must be a number"),
    ],
)
def test_a_malformed_record_is_a_manifest_error_naming_the_key(old_manifest, edit, message):
    edit(old_manifest)
    with pytest.raises(ManifestError, match=message.replace(".", r"\.").replace("(", r"\(")):
        BuildManifest.from_dict(old_manifest, "manifest.json")
