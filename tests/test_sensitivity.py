"""Label-free sensitivity and the auto preset, with real ModelOpt calibration and onnxruntime.

One small calibration (4 images of the shared build's calib.npy, everything quantizable in INT8) is shared by the
module; tuning images come from calib2017 after the build's 64 calibration images.
"""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest

from packager.calibration.calibration import list_images, split_calibration_and_tuning
from packager.core.manifest import BuildManifest
from packager.pipeline.manifest import artifact_path
from packager.quantize.qdq_graph import find_units, int8_conv_mac_share, keep_precise, quantized_inputs
from packager.quantize.int8 import QuantizeOptions, quantize_int8_twins
from packager.metrics.intervals import paired_difference, weighted_map
from packager.quantize.sensitivity import AgreementScorer, agreement_per_image, analyze, chosen, greedy_keep_precise

CALIB = 4


def _session(model):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _run(model, tensor):
    session = _session(model)
    return session.run(None, {session.get_inputs()[0].name: tensor})[0]


@pytest.fixture(scope="module")
def calibration(yolov8n_build):
    return np.load(yolov8n_build / "calib.npy")[:CALIB]


@pytest.fixture(scope="module")
def all_int8(yolov8n_build, calibration, tmp_path_factory):
    """Everything quantizable in INT8 (preset auto before selection), calibrated once."""
    out = tmp_path_factory.mktemp("all-int8")
    result = quantize_int8_twins(artifact_path(yolov8n_build, "fp32"), calibration, out, QuantizeOptions(preset="auto"))
    return onnx.load(str(result.int8_fp32_path))


@pytest.fixture(scope="module")
def tuning_files(yolov8n_build, assets):
    files = list_images(assets / "coco" / "calib2017")
    _, tuning = split_calibration_and_tuning(files, BuildManifest.load(yolov8n_build).calibration.count, max_tune=3)
    return tuning


@pytest.fixture(scope="module")
def scorer(yolov8n_build, tuning_files):
    spec = BuildManifest.load(yolov8n_build).model
    fp32 = onnx.load(str(artifact_path(yolov8n_build, "fp32")))
    return AgreementScorer(fp32, tuning_files, spec.imgsz, list(spec.class_names))


@pytest.mark.parametrize("unit_name", ["model.4", "model.9", "model.22/cv3.0"])
def test_removing_a_units_qdq_equals_excluding_it_at_calibration(
        unit_name, yolov8n_build, calibration, all_int8, tuning_files, tmp_path):
    """keep_precise(all-INT8, unit) == ModelOpt quantization with the unit's nodes in nodes_to_exclude (same data).

    model.4 is a C2f whose Split output feeds three consumers through one shared Q/DQ pair, model.9 the SPPF
    (MaxPool/Concat Q/DQ), model.22/cv3.0 a head branch.
    """
    unit = next(u for u in find_units(all_int8) if u.name == unit_name)
    derived = keep_precise(all_int8, unit.nodes)
    options = QuantizeOptions(preset="auto", exclude_nodes=[re.escape(n) + "$" for n in unit.nodes])
    excluded = onnx.load(str(quantize_int8_twins(artifact_path(yolov8n_build, "fp32"), calibration, tmp_path,
                                                 options).int8_fp32_path))
    # Same Q/DQ placement: the same compute nodes read the same inputs through Q/DQ.
    assert quantized_inputs(derived) == quantized_inputs(excluded)
    assert not set(unit.nodes) & set(quantized_inputs(derived))
    assert int8_conv_mac_share(derived) < 1.0 or unit.conv_macs == 0
    from packager.inference.letterbox import preprocess, read_image

    tensor = np.stack([preprocess(read_image(p), (640, 640))[0] for p in tuning_files[:2]])
    ours, theirs = _run(derived, tensor), _run(excluded, tensor)
    # Same scales and graph: identical up to float summation order inside onnxruntime's fused kernels; a one-step
    # INT8 rounding flip anywhere would show as an error of the size of a box pixel, far above this tolerance.
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-3)
    assert not np.array_equal(ours, _run(all_int8, tensor))  # and the unit really made a difference


def test_sensitivity_ranks_units_and_auto_stops_at_the_target(all_int8, scorer):
    units = find_units(all_int8)
    fp32_like = scorer.score(keep_precise(all_int8, [n for u in units for n in u.nodes]))
    assert fp32_like.agreement == pytest.approx(1.0) and fp32_like.sqnr_db > 60  # no Q/DQ left: FP32 again

    result = analyze(all_int8, scorer, refine=0, show_progress=False)
    assert {u.unit for u in result.units} == {u.name for u in units}
    keys = [(u.alone.agreement, u.alone.sqnr_db) for u in result.units]
    assert keys == sorted(keys)  # most sensitive (least agreement alone) first
    # All units together are noisier than the noisiest alone, and quantizing one unit changes the output.
    assert result.all_int8.sqnr_db < min(sqnr for _, sqnr in keys)
    assert all(sqnr < 100 for _, sqnr in keys)

    ranking = result.units
    order = {u.unit: i for i, u in enumerate(ranking)}
    # The plain prefix walk: every tried unit stays precise, in ranking order.
    walk = greedy_keep_precise(all_int8, ranking, scorer, target=1.01, max_trials=4, accept_all=True,
                               show_progress=False)
    assert [s.kept_precise for s in walk] == [[u.unit for u in ranking[:k]] for k in range(5)]
    assert walk[-1].int8_coverage < walk[0].int8_coverage

    # With rejection: tried units in ranking order; a unit stays precise only if the agreement improves.
    steps = greedy_keep_precise(all_int8, ranking, scorer, target=1.01, max_trials=6, show_progress=False)
    assert [s.unit for s in steps[1:]] == [u.unit for u in ranking[:6]]
    best = steps[0].score.agreement
    for step in steps[1:]:
        assert step.accepted == (step.score.agreement > best)
        best = max(best, step.score.agreement)
    final = chosen(steps)
    assert [order[u] for u in final.kept_precise] == sorted(order[u] for u in final.kept_precise)
    accepted = [s for s in steps[1:] if s.accepted]
    assert accepted, f"keeping any of the 6 most sensitive units precise never improved agreement: {steps}"
    # A target first reached by an accepted step: greedy must stop right there, with that configuration.
    target = accepted[0].score.agreement
    stopped = greedy_keep_precise(all_int8, ranking, scorer, target=target, max_trials=6, show_progress=False)
    assert stopped[-1] == accepted[0] and chosen(stopped) == accepted[0]
    assert all(s.score.agreement < target for s in stopped[:-1])


def test_split_calibration_and_tuning_is_disjoint(tmp_path):
    files = [tmp_path / f"{i:03d}.jpg" for i in range(10)]
    calib, tune = split_calibration_and_tuning(files, 4)
    assert calib == files[:4] and tune == files[4:]
    calib, tune = split_calibration_and_tuning(files, 4, tune_files=files[2:7], max_tune=2)
    assert tune == files[4:6]  # the two calibration files among the tuning folder are dropped
    assert not set(calib) & set(tune)


def test_build_with_auto_preset_records_its_choice(assets, tmp_path):
    """A whole `yqpack build --preset auto` at 320 px: calibration 8 images, tuning the next 4 (disjoint)."""
    from packager.pipeline.run import BuildOptions, run_build

    out = tmp_path / "auto"
    result = run_build(BuildOptions(
        model=assets / "weights" / "yolov8n.pt", out=out, imgsz=(320, 320),
        calib_images=assets / "coco" / "calib2017", calib_size=8, max_tune_images=4, show_progress=False,
        quantize=QuantizeOptions(preset="auto", auto_target=0.9, auto_refine=0),
    ))
    manifest = json.loads((out / "manifest.json").read_text())
    auto = manifest["quantization"]["auto"]
    calib_names = [p.name for p in list_images(assets / "coco" / "calib2017")[:8]]
    tuning = manifest["calibration"]["tuning"]
    assert tuning["count"] == 4 and not set(tuning["files"]) & set(calib_names)
    order = [r["unit"] for r in auto["ranking"]]
    assert [s["tried"] for s in auto["steps"][1:]] == order[: len(auto["steps"]) - 1]
    assert auto["kept_precise"] == [s["tried"] for s in auto["steps"] if s["accepted"] and s["tried"]]
    assert auto["met_target"] == (auto["final"]["agreement"] >= 0.9)
    assert auto["met_target"] or len(auto["steps"]) > 12  # stops at the target or after AUTO_MAX_TRIALS
    assert manifest["quantization"]["int8_mac_coverage"] == pytest.approx(auto["final"]["int8_mac_coverage"],
                                                                            abs=1e-4)
    int8 = onnx.load(str(out / "onnx" / "model.int8-fp32.onnx"))
    assert not set(manifest["quantization"]["excluded_nodes"]) & set(quantized_inputs(int8))
    assert result.quantization.auto is not None


def test_sensitivity_cli_writes_json_table_and_chart(yolov8n_build, assets, tmp_path):
    """`yqpack sensitivity` on the build's own calibration folder: its calibration images are skipped."""
    from click.testing import CliRunner

    from packager.cli.main import main

    out = tmp_path / "sens" / "sensitivity.json"
    result = CliRunner().invoke(main, ["sensitivity", "--build", str(yolov8n_build), "--images",
                                       str(assets / "coco" / "calib2017"), "--max-images", "2", "--refine", "0",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    calib_count = BuildManifest.load(yolov8n_build).calibration.count
    files = [p.name for p in list_images(assets / "coco" / "calib2017")]
    assert data["image_files"] == files[calib_count:calib_count + 2]
    keys = [(u["alone"]["agreement"], u["alone"]["sqnr_db"]) for u in data["units"]]
    assert keys == sorted(keys) and len(keys) > 20
    assert f"`{data['units'][0]['unit']}`" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_downstream_submodel_from_cached_fp32_equals_the_full_variant(all_int8, scorer):
    """The speed-up of `analyze`: run only what a unit's Q/DQ can change, fed with cached FP32 tensors."""
    from packager.quantize.qdq_graph import downstream_submodel, only_quantized

    for unit in [u for u in find_units(all_int8) if u.name in ("model.8", "model.22/cv3.1")]:
        variant = only_quantized(all_int8, unit.nodes)
        sub, cut = downstream_submodel(variant, unit.nodes)
        assert len(sub.graph.node) < len(variant.graph.node) and "images" not in cut
        assert set(cut) <= scorer.cache_fp32([cut])
        np.testing.assert_array_equal(scorer._raw(sub, cut), scorer._raw(variant))


def test_agreement_per_image_matches_the_scorer_and_bootstraps_against_fp32(all_int8, scorer):
    """The per-image path (used to compare recipes with intervals) gives the scorer's agreement exactly; FP32
    agrees with itself perfectly on every resample, so an INT8 model can only fall below it."""
    names, imgsz = scorer.class_names, tuple(scorer.tensor.shape[2:])
    fp32 = agreement_per_image(scorer.reference_dets, scorer.reference_dets, names, imgsz)
    int8 = agreement_per_image(scorer._detections(scorer._raw(all_int8)), scorer.reference_dets, names, imgsz)
    assert fp32.metrics.map50_95 == 1.0
    assert round(int8.metrics.map50_95, 5) == scorer.score(all_int8).agreement < 1.0
    assert weighted_map(int8.per_image, np.ones((1, len(scorer.names))))[0] == pytest.approx(int8.metrics.map50_95)
    difference = paired_difference(int8.per_image, fp32.per_image, "all-int8", "fp32", resamples=200)
    assert difference.difference < 0 and difference.low <= difference.difference <= difference.high <= 0
