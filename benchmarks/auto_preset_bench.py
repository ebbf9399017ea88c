"""INT8 frontier benchmark (not a test): label-free tuning on calibration-side images, gate on unseen val images.

From one build (its FP32 export and calib.npy, i.e. the first --calib-size images of calib2017):
  1. calibrate once with everything quantizable in INT8 (preset auto before selection),
  2. sensitivity ranking on tuning images = calib2017 after the calibration images (never val2017),
  3. greedy walk: keep 0, 1, 2, ... most sensitive units precise; per step the tuning agreement, INT8 conv-MAC
     share and the COCO mAP50-95 ratio INT8/FP32 on the labelled val images (int8-fp32 twin, run by the default
     evaluation runtime, OpenVINO f32 hint; docs/img/int8_frontier_yolov8n.png was made with onnxruntime),
  4. the same val numbers for the build's own preset (mixed) and for extreme (one more calibration),
  5. which step each --targets agreement target picks, a frontier plot and a JSON with every number.

    PYTHONPATH=. .venv/bin/python benchmarks/auto_preset_bench.py --build build/yolov8n --out reports/auto_bench
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from packager.core.paths import assets_dir
from packager.quantize.auto_preset import AUTO_MAX_TRIALS
from packager.calibration.calibration import list_images, split_calibration_and_tuning
from packager.metrics.coco_eval import CocoGroundTruth, evaluate
from packager.core.manifest import BuildManifest
from packager.pipeline.manifest import artifact_path
from packager.evaluate.onnx_eval import detect_images
from packager.quantize.qdq_graph import int8_conv_mac_share, keep_precise
from packager.quantize.int8 import QuantizeOptions, quantize_int8_twins
from packager.quantize.sensitivity import AgreementScorer, Score, UnitScore, analyze, chosen, greedy_keep_precise, ranked


def val_map(model, images, ground_truth, class_names, imgsz, work: Path, label: str) -> float:
    path = work / f"{label}.onnx"
    onnx.save(model, str(path))
    detections = detect_images(path, images, imgsz, label=label, show_progress=False)
    return evaluate(detections, ground_truth, class_names).map50_95


def evaluate_presets(build: Path, calib: np.ndarray, scorer: AgreementScorer, context) -> dict:
    """FP32 val mAP, and agreement / INT8 coverage / val ratio of the build's own preset (mixed) and extreme."""
    fp32_path = artifact_path(build, "fp32")
    fp32_map = val_map(onnx.load(str(fp32_path)), *context, "fp32")
    presets = {"mixed": onnx.load(str(artifact_path(build, "int8-fp32")))}
    work = context[-1]
    extreme = quantize_int8_twins(fp32_path, calib, work / "extreme", QuantizeOptions(preset="extreme"))
    presets["extreme"] = onnx.load(str(extreme.int8_fp32_path))
    rows = {}
    for name, model in presets.items():
        rows[name] = {"agreement": scorer.score(model).agreement, "int8_conv_mac_share": int8_conv_mac_share(model),
                      "val_ratio": val_map(model, *context, name) / fp32_map}
        print(name, json.dumps(rows[name]), flush=True)
    return {"fp32_val_map50_95": fp32_map, "presets": rows}


def greedy_targets(all_int8, ranking, scorer, targets, context, fp32_map) -> dict:
    """The auto preset's greedy (with rejection) up to the highest target; per target its choice and val ratio."""
    steps = greedy_keep_precise(all_int8, ranking, scorer, target=max(targets), max_trials=AUTO_MAX_TRIALS)
    trials = [{"tried": s.unit, "accepted": s.accepted, "kept_precise": s.kept_precise, "agreement": s.score.agreement,
               "int8_conv_mac_share": s.int8_coverage} for s in steps]
    print(json.dumps(trials), flush=True)
    choices, val = {}, {}
    for target in targets:
        step = next((s for s in steps if s.accepted and s.score.agreement >= target), chosen(steps))
        key = ",".join(step.kept_precise)
        if key not in val:
            nodes = [n for unit in ranking if unit.unit in step.kept_precise for n in unit.nodes]
            val[key] = val_map(keep_precise(all_int8, nodes), *context, f"auto{len(val)}") / fp32_map
        choices[str(target)] = {"kept_precise": step.kept_precise, "agreement": step.score.agreement,
                                "met": step.score.agreement >= target, "int8_conv_mac_share": step.int8_coverage,
                                "val_ratio": val[key]}
        print(target, json.dumps(choices[str(target)]), flush=True)
    return {"trials": trials, "targets": choices}


def load_ranking(path: Path) -> tuple[Score, list[UnitScore]]:
    data = json.loads(path.read_text())
    units = [UnitScore(u["unit"], u["nodes"], u["conv_macs"], Score(**u["alone"])) for u in data["units"]]
    return Score(**data["all_int8"]), ranked(units)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("reports/auto_bench"))
    parser.add_argument("--tune-images", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="greedy steps evaluated on val")
    parser.add_argument("--targets", default="0.95,0.96,0.97,0.98")
    parser.add_argument("--sensitivity", type=Path, help="reuse a sensitivity.json of the same build")
    parser.add_argument("--all-int8", type=Path, help="reuse an all-INT8 int8-fp32 ONNX of the same calibration")
    parser.add_argument("--greedy-only", action="store_true", help="skip the prefix walk (frontier)")
    parser.add_argument("--presets-only", action="store_true",
                        help="only FP32/mixed/extreme on val (cached in OUT/presets.json for the full run)")
    args = parser.parse_args()
    assets = assets_dir()
    manifest = BuildManifest.load(args.build)
    imgsz, names = manifest.model.imgsz, list(manifest.model.class_names)
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="auto-bench-"))
    timings, started = {}, time.perf_counter()
    calib = np.load(args.build / "calib.npy")
    fp32_path = artifact_path(args.build, "fp32")
    files = list_images(assets / "coco" / "calib2017")
    _, tuning = split_calibration_and_tuning(files, manifest.calibration.count, max_tune=args.tune_images)
    scorer = AgreementScorer(onnx.load(str(fp32_path)), tuning, imgsz, names)
    ground_truth = CocoGroundTruth(assets / "coco" / "annotations" / "instances_val2017_128.json")
    val_images = ground_truth.image_files(assets / "coco" / "val2017")
    context = (val_images, ground_truth, names, imgsz, work)
    cached = args.out / "presets.json"
    if args.presets_only or not cached.is_file():
        cached.write_text(json.dumps(evaluate_presets(args.build, calib, scorer, context), indent=2))
        if args.presets_only:
            return
    cached_presets = json.loads(cached.read_text())
    fp32_map, preset_rows = cached_presets["fp32_val_map50_95"], cached_presets["presets"]
    timings["presets"] = time.perf_counter() - started
    if args.all_int8:
        all_int8 = onnx.load(str(args.all_int8))
    else:
        result = quantize_int8_twins(fp32_path, calib, work / "all", QuantizeOptions(preset="auto"))
        all_int8 = onnx.load(str(result.int8_fp32_path))
        onnx.save(all_int8, str(args.out / "all-int8.onnx"))  # for benchmarks/heldout_agreement.py
    timings["calibration"] = time.perf_counter() - started - sum(timings.values())
    if args.sensitivity:
        all_score, ranking = load_ranking(args.sensitivity)
    else:
        sensitivity = analyze(all_int8, scorer, refine=2)
        all_score, ranking = sensitivity.all_int8, sensitivity.units
        (args.out / "sensitivity.json").write_text(json.dumps(sensitivity.as_dict(), indent=2))
    timings["sensitivity"] = time.perf_counter() - started - sum(timings.values())
    targets = sorted(float(t) for t in args.targets.split(","))
    greedy = greedy_targets(all_int8, ranking, scorer, targets, context, fp32_map)
    (args.out / "greedy.json").write_text(json.dumps(greedy, indent=2))
    timings["greedy"] = time.perf_counter() - started - sum(timings.values())
    if args.greedy_only:
        return
    walk = greedy_keep_precise(all_int8, ranking, scorer, target=1.01, max_trials=args.steps, accept_all=True)
    timings["walk"] = time.perf_counter() - started - sum(timings.values())

    rows = []
    for k, step in enumerate(walk):
        model = keep_precise(all_int8, [n for unit in ranking for n in unit.nodes if unit.unit in step.kept_precise])
        ratio = val_map(model, *context, f"step{k}") / fp32_map
        rows.append({"step": k, "kept_precise": step.kept_precise, "agreement": step.score.agreement,
                     "sqnr_db": step.score.sqnr_db, "int8_conv_mac_share": step.int8_coverage, "val_ratio": ratio})
        print(json.dumps(rows[-1]), flush=True)
    timings["val"] = time.perf_counter() - started - sum(timings.values())
    report = {"fp32_val_map50_95": fp32_map, "val_images": len(val_images), "tuning_images": len(tuning),
              "calibration_images": int(len(calib)), "all_int8": all_score.__dict__, "walk": rows,
              "presets": preset_rows, "greedy": greedy, "timings_s": {k: round(v, 1) for k, v in timings.items()}}
    (args.out / "auto_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, preset_rows, args.out / "frontier.png", manifest.model.name)
    print(json.dumps({"timings_s": report["timings_s"]}, indent=1))


def plot(rows, presets, path: Path, model_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    coverage = [100 * r["int8_conv_mac_share"] for r in rows]
    ax.plot(coverage, [r["agreement"] for r in rows], "o-", label="agreement with FP32 (tuning, calib2017)")
    ax.plot(coverage, [r["val_ratio"] for r in rows], "s-", label="mAP50-95 INT8/FP32 (val2017, 128 labelled)")
    for k, r in enumerate(rows):
        ax.annotate(str(k), (coverage[k], r["val_ratio"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for name, r in presets.items():
        ax.plot(100 * r["int8_conv_mac_share"], r["val_ratio"], "^", markersize=9, label=f"{name} (val ratio)")
    ax.axhline(0.99, color="grey", linestyle=":", label="0.99 gate")
    ax.set_xlabel("INT8 share of convolution MACs, % (auto: step k = k most sensitive units kept precise)")
    ax.set_ylabel("ratio / agreement")
    ax.set_title(f"{model_name}: INT8 accuracy vs coverage (±3 % interval on 128 val images)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
