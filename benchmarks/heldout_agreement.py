"""Which INT8 recipe should be the default? Label-free agreement with FP32 on images never used to choose it.

One command, one build (its FP32 export and calib.npy = the first `calibration.count` images of calib2017):

  1. the data split exactly as the build and `--preset auto` make it (`split_calibration_and_tuning`):
     calibration = first 64 of calib2017, tuning = the next 64 (what `auto` tunes on), held out = the rest (130,
     never used for anything); plus the 128 val2017 images (labels used only for the labelled check);
  2. the recipes, each from the same export and calibration tensor: everything INT8 (ModelOpt's default
     placement), `mixed` (today's default), `mixed` without its residual-Add exclusion, and `auto` at its default
     target through the real build code (`quantize_int8_twins` + `apply_auto_preset`; its greedy trials also give
     the choice at each `--auto-targets` value);
  3. every model (int8-fp32 twins and FP32) through OpenVINO with the f32 hint, the project's default CPU runtime
     (real integer kernels, as served): label-free agreement = COCO mAP50-95 of the recipe's detections scored
     against the FP32 detections (score >= 0.25) as pseudo ground truth, on the 258 unseen images (130 held-out
     calib2017 + 128 val2017, labels unused), with a paired bootstrap (1,000 resamples of pycocotools' per-image
     results, detection never re-run) of each recipe's agreement and of every pairwise difference; the INT8 share
     of conv MACs; the labelled val2017 mAP50-95 ratio vs FP32 with its interval (a check, never a ranking).

    PYTHONPATH=. nice -n 10 .venv/bin/python benchmarks/heldout_agreement.py --build build/yolov8n \
        --out reports/heldout

Writes OUT/heldout_agreement.json (every number, with each recipe's own percentile interval and an OpenVINO
latency probe) and OUT/heldout_agreement.md (the README tables). OUT/models keeps the recipes' ONNX files and
OUT/detections-RUNTIME.pkl their detections; `--reuse` starts from those (no quantization, no detection).
`--runtime onnxruntime` scores the same models with onnxruntime's emulated INT8 (files get a -onnxruntime suffix).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pickle
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from rich.progress import track

from packager.core.paths import assets_dir
from packager.metrics.intervals import paired_difference, paired_ratio, resampled_interval
from packager.calibration.calibration import list_images, split_calibration_and_tuning
from packager.metrics.coco_eval import CocoGroundTruth, evaluate_images
from packager.core.manifest import BuildManifest
from packager.metrics.mac_coverage import conv_coverage
from packager.inference.letterbox import preprocess, read_image
from packager.inference.postprocess import EVAL_THRESHOLDS, postprocess
from packager.quantize.qdq_graph import find_units, keep_precise
from packager.quantize.auto_preset import apply_auto_preset
from packager.quantize.int8 import (
    DEFAULT_AUTO_TARGET,
    QuantizeOptions,
    head_nodes_to_keep_precise,
    quantize_int8_twins,
)
from packager.inference.runtime import RUNTIMES, RuntimeOptions, open_model
from packager.quantize.sensitivity import AGREEMENT_THRESHOLDS, PseudoGroundTruth, agreement_per_image

DESCRIPTIONS = {
    "all-int8": "everything INT8 (ModelOpt default placement)",
    "mixed": "`mixed` (head output convs, DFL/decode, residual Adds precise)",
    "mixed-no-add": "`mixed` without the residual-Add exclusion (head output convs, DFL/decode precise)",
}


@dataclass
class Split:
    calibration: list[Path]
    tuning: list[Path]
    held_out: list[Path]  # calib2017 after calibration and tuning: never used for anything
    val: list[Path]  # val2017: labels only for the labelled check


@dataclass
class Recipe:
    name: str
    path: Path  # int8-fp32 twin
    description: str
    build_s: float  # quantization (+ auto's sensitivity and greedy) wall time in this run
    details: dict = field(default_factory=dict)


def data_split(build: Path, manifest: BuildManifest, assets: Path, val: list[Path]) -> Split:
    """The build's own split of calib2017, checked against what its manifest recorded."""
    files = list_images(assets / "coco" / "calib2017")
    count = manifest.calibration.count
    max_tune = manifest.calibration.tuning.count or 64
    calibration, tuning = split_calibration_and_tuning(files, count, max_tune=max_tune)
    recorded = set(manifest.calibration.image_sha256.values())
    if recorded and recorded != {p.name for p in calibration}:
        raise SystemExit(f"{build}: its calibration images are not the first {count} of calib2017")
    used = {p.name for p in calibration + tuning}
    held_out = [p for p in files if p.name not in used]
    if {p.name for p in held_out + tuning} & {p.name for p in val}:
        raise SystemExit("calib2017 and val2017 share file names: the pseudo ground truth needs unique names")
    return Split(calibration, tuning, held_out, val)


def build_recipes(build: Path, manifest: BuildManifest, split: Split, out: Path, auto_targets: list[float],
                  reuse: bool) -> list[Recipe]:
    """Quantize every recipe from the build's FP32 export and calib.npy (or reload them with `reuse`)."""
    models, record = out / "models", out / "recipes.json"
    if reuse and record.is_file():
        return [Recipe(r["name"], Path(r["path"]), r["description"], r["build_s"], r["details"])
                for r in json.loads(record.read_text())]
    models.mkdir(parents=True, exist_ok=True)
    fp32_path, calib = manifest.artifact_path(build, "fp32"), np.load(manifest.artifact_path(build, "calib"))
    head = head_nodes_to_keep_precise(onnx.load(str(fp32_path)))
    recipes = []
    for name, options in (("mixed", QuantizeOptions(preset="mixed")),
                          # preset auto before its selection = no preset exclusions; plus mixed's head nodes
                          ("mixed-no-add", QuantizeOptions(preset="auto",
                                                           exclude_nodes=[re.escape(n) + "$" for n in head]))):
        result = quantize_int8_twins(fp32_path, calib, out / "work" / name, options)
        recipes.append(Recipe(name, _keep(result.int8_fp32_path, models / f"{name}.onnx"), DESCRIPTIONS[name],
                              result.wall_time_s, {"excluded_ops": result.excluded_ops,
                                                   "excluded_nodes": len(result.excluded_nodes)}))
    recipes = _auto_recipes(fp32_path, calib, split, manifest, out, auto_targets) + recipes
    record.write_text(json.dumps([{**r.__dict__, "path": str(r.path)} for r in recipes], indent=2) + "\n")
    shutil.rmtree(out / "work", ignore_errors=True)
    return recipes


def _auto_recipes(fp32_path, calib, split: Split, manifest: BuildManifest, out: Path,
                  auto_targets: list[float]) -> list[Recipe]:
    """Everything INT8, and `auto` as a build makes it: calibrate with no exclusions, then apply_auto_preset on
    the tuning images (onnxruntime, as in the build) at the default target; other targets from its greedy trials."""
    options = QuantizeOptions(preset="auto", auto_target=DEFAULT_AUTO_TARGET)
    result = quantize_int8_twins(fp32_path, calib, out / "work" / "auto", options)
    all_int8 = _keep(result.int8_fp32_path, out / "models" / "all-int8.onnx")
    quantize_s = result.wall_time_s
    result = apply_auto_preset(result, fp32_path, split.tuning, manifest.model.imgsz,
                               list(manifest.model.class_names), options)
    auto = result.auto
    recipes = [Recipe("all-int8", all_int8, DESCRIPTIONS["all-int8"], quantize_s),
               Recipe(f"auto {auto.target}", _keep(result.int8_fp32_path, out / "models" / "auto.onnx"),
                      f"`auto`, default target {auto.target}: {', '.join(auto.kept_precise)} precise",
                      round(quantize_s + auto.wall_time_s, 1), {"auto": auto.as_dict()})]
    # The greedy walk is deterministic and stops at the first accepted trial reaching the target, so a lower
    # target's choice is that trial of this walk.
    for target in sorted(set(auto_targets) - {auto.target}, reverse=True):
        step = next((s for s in auto.steps if s["accepted"] and s["agreement"] >= target), None)
        if step is None or step["kept_precise"] == auto.kept_precise:
            continue
        model = onnx.load(str(all_int8))
        nodes = _unit_nodes(model)
        path = out / "models" / f"auto-{target}.onnx"
        onnx.save(keep_precise(model, [n for unit in step["kept_precise"] for n in nodes[unit]]), str(path))
        recipes.append(Recipe(f"auto {target}", path,
                              f"`auto`, target {target}: {', '.join(step['kept_precise'])} precise",
                              round(quantize_s + auto.wall_time_s, 1), {"kept_precise": step["kept_precise"]}))
    return recipes


def _unit_nodes(model) -> dict[str, tuple[str, ...]]:
    """{unit: nodes} for every unit and every unit split once (the names sensitivity's ranking can hold)."""
    top = find_units(model)
    return {u.name: u.nodes for u in find_units(model, refine=[t.name for t in top]) + top}


def _keep(path: Path, target: Path) -> Path:
    shutil.copyfile(path, target)
    return target


@dataclass
class Detections:
    agreement: dict[str, np.ndarray]  # every image, the agreement thresholds (conf 0.01, 100 per image)
    labelled: dict[str, np.ndarray]  # val2017 only, the evaluation thresholds (conf 0.001, 300 per image)
    seconds: float
    conv_precisions: dict[str, int]  # OpenVINO's executed Convolution layers by runtime precision


def detect(path: Path, images: list[Path], val_names: set[str], manifest: BuildManifest, label: str,
           runtime: RuntimeOptions) -> Detections:
    """One pass per image; both threshold sets decoded from the same raw output."""
    model = open_model(path, runtime)
    imgsz, head = manifest.model.imgsz, manifest.model.head.value
    agreement, labelled = {}, {}
    started = time.perf_counter()
    for image in track(images, description=f"{label} ({model.label})"):
        chw, info = preprocess(read_image(image), imgsz)
        raw = model.run(chw[None])[0]
        agreement[image.name] = postprocess(raw, info, AGREEMENT_THRESHOLDS, head)
        if image.name in val_names:
            labelled[image.name] = postprocess(raw, info, EVAL_THRESHOLDS, head)
    precisions = model.layer_precisions().get("Convolution", {}) if model.runtime == "openvino" else {}
    return Detections(agreement, labelled, round(time.perf_counter() - started, 1), precisions)


def compare(recipes: list[Recipe], detections: dict[str, Detections], split: Split, manifest: BuildManifest,
            val_truth: CocoGroundTruth, resamples: int) -> dict:
    """Agreement (with interval) per recipe and image set, every pairwise difference on the unseen images,
    and the labelled val ratio vs FP32 (with interval)."""
    names, imgsz = list(manifest.model.class_names), manifest.model.imgsz
    pseudo = PseudoGroundTruth(detections["fp32"].agreement, names, imgsz)
    index = {name: i for i, name in enumerate(sorted(pseudo.image_ids, key=pseudo.image_ids.get))}
    sets = {"unseen": split.held_out + split.val, "held-out calib2017": split.held_out, "val2017": split.val,
            "tuning": split.tuning}
    subsets = {key: np.array(sorted(index[p.name] for p in files)) for key, files in sets.items()}
    agreement = {r: agreement_per_image(detections[r].agreement, detections["fp32"].agreement, names, imgsz).per_image
                 for r in detections}
    labelled = {r: evaluate_images(detections[r].labelled, val_truth, names) for r in detections}
    rows = {}
    for recipe in [None, *recipes]:
        key = "fp32" if recipe is None else recipe.name
        rows[key] = {"agreement": {s: dict(zip(("value", "low", "high"), resampled_interval(
            agreement[key], resamples, subset=subset))) for s, subset in subsets.items()},
            "val_map50_95": labelled[key].metrics.map50_95,
            "val_ratio": paired_ratio(labelled[key].per_image, labelled["fp32"].per_image, key, "fp32",
                                      resamples).as_dict()}
    pairs = {f"{a.name} - {b.name}": {s: paired_difference(agreement[a.name], agreement[b.name], a.name, b.name,
                                                           resamples, subset=subsets[s]).as_dict()
                                      for s in ("unseen", "held-out calib2017", "val2017")}
             for a, b in itertools.permutations(recipes, 2) if a.name < b.name}
    return {"images": {s: len(f) for s, f in sets.items()}, "rows": rows, "differences": pairs}


def coverage(recipe: Recipe) -> float:
    return conv_coverage(recipe.path).share("int8")


def markdown(recipes: list[Recipe], detections: dict[str, Detections], result: dict, incumbent: str = "mixed") -> str:
    rows, n, diffs = result["rows"], result["images"], result["differences"]
    lines = [f"| recipe | INT8 share of conv MACs (OpenVINO i8 convs) | agreement, "
             f"{n['unseen']} unseen images | minus `{incumbent}` [95 % CI] | held-out calib2017 "
             f"({n['held-out calib2017']}) | val2017 ({n['val2017']}, labels unused) | tuning ({n['tuning']}, seen by "
             f"auto) | labelled val mAP50-95 ratio vs FP32 [95 % CI] | build s |", "|" + "---|" * 9]
    for recipe in recipes:
        row, convs, a = rows[recipe.name], detections[recipe.name].conv_precisions, rows[recipe.name]["agreement"]
        ratio = row["val_ratio"]
        diff = _difference(diffs, recipe.name, incumbent)
        lines.append(
            f"| {recipe.description} | {100 * coverage(recipe):.1f} % ({_i8_convs(convs)}) "
            f"| **{a['unseen']['value']:.3f}** | {diff} "
            f"| {a['held-out calib2017']['value']:.3f} | {a['val2017']['value']:.3f} | {a['tuning']['value']:.3f} "
            f"| {ratio['ratio']:.3f} [{ratio['low']:.3f}-{ratio['high']:.3f}] | {recipe.build_s:.0f} |")
    lines += ["", "| A - B, agreement (paired bootstrap, 95 % CI; * = excludes 0) | 258 unseen | held-out calib2017 "
              "| val2017 |", "|---|---|---|---|"]
    for pair, by_set in diffs.items():
        cells = [f"{d['difference']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]{' *' if d['decided'] else ''}"
                 for d in by_set.values()]
        lines.append(f"| {pair} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _i8_convs(convs: dict[str, int]) -> str:
    return f"{convs.get('i8', 0)}/{sum(convs.values())}" if convs else "not OpenVINO"


def _difference(diffs: dict, name: str, incumbent: str) -> str:
    if name == incumbent:
        return "-"
    key, sign = (f"{name} - {incumbent}", 1) if f"{name} - {incumbent}" in diffs else (f"{incumbent} - {name}", -1)
    d = diffs[key]["unseen"]
    low, high = sorted((sign * d["low"], sign * d["high"]))
    return f"{sign * d['difference']:+.4f} [{low:+.4f}, {high:+.4f}]{' *' if d['decided'] else ''}"


def measure_latency(paths: dict[str, Path], image: Path, imgsz, runtime: RuntimeOptions, rounds: int = 3,
                    runs: int = 20) -> dict[str, float]:
    """Median ms per batch-1 inference (OpenVINO f32 hint), models alternated round by round so that a change in
    machine load hits all of them alike. JSON only: on a shared 2-core machine the INT8 recipes' ratios to FP32
    moved by +-0.1 from round to round, more than they differ from each other."""
    chw = preprocess(read_image(image), imgsz)[0][None]
    models = {name: open_model(path, runtime) for name, path in paths.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            model.run(chw)  # warm-up after the other models ran
            for _ in range(runs):
                started = time.perf_counter()
                model.run(chw)
                times[name].append(1000 * (time.perf_counter() - started))
    return {name: float(np.median(t)) for name, t in times.items()}


def detect_all(paths: dict[str, Path], images: list[Path], val_names: set[str], manifest: BuildManifest,
               cache: Path, reuse: bool, runtime: RuntimeOptions) -> dict[str, Detections]:
    """Detections of every model, kept in `cache`; with `reuse` read from it when it holds exactly these models."""
    if reuse and cache.is_file():
        cached = pickle.loads(cache.read_bytes())
        if set(cached) == set(paths):
            return cached
    detections = {name: detect(path, images, val_names, manifest, name, runtime) for name, path in paths.items()}
    cache.write_bytes(pickle.dumps(detections))
    return detections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", type=Path, required=True, help="a build with preset mixed (its export, calib.npy)")
    parser.add_argument("--out", type=Path, default=Path("reports/heldout"))
    parser.add_argument("--auto-targets", default="0.96", help="extra auto targets read off the same greedy walk")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--runtime", choices=RUNTIMES, default="openvino",
                        help="what runs the models (openvino: f32 hint, the project's default)")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse OUT/models (no quantization) and OUT/detections.pkl (no detection) when present")
    args = parser.parse_args()
    started, load = time.perf_counter(), os.getloadavg()
    assets, manifest = assets_dir(), BuildManifest.load(args.build)
    val_truth = CocoGroundTruth(assets / "coco" / "annotations" / "instances_val2017_128.json")
    split = data_split(args.build, manifest, assets, val_truth.image_files(assets / "coco" / "val2017"))
    args.out.mkdir(parents=True, exist_ok=True)
    recipes = build_recipes(args.build, manifest, split, args.out,
                            [float(t) for t in args.auto_targets.split(",") if t], args.reuse)
    quantized = time.perf_counter()
    images, val_names = split.tuning + split.held_out + split.val, {p.name for p in split.val}
    paths = {"fp32": manifest.artifact_path(args.build, "fp32"), **{r.name: r.path for r in recipes}}
    runtime = RuntimeOptions(args.runtime, precision_hint="f32")
    detections = detect_all(paths, images, val_names, manifest, args.out / f"detections-{args.runtime}.pkl",
                            args.reuse, runtime)
    evaluated = time.perf_counter()
    latency = measure_latency(paths, split.val[0], manifest.model.imgsz, runtime)
    result = compare(recipes, detections, split, manifest, val_truth, args.resamples)
    report = {"runtime": open_model(paths["fp32"], runtime).label, "build": str(args.build),
              "split": {k: [p.name for p in v] for k, v in split.__dict__.items()},
              "recipes": [{**r.__dict__, "path": str(r.path), "int8_conv_mac_share": coverage(r),
                           "openvino_conv_precisions": detections[r.name].conv_precisions} for r in recipes],
              **result, "openvino_latency_ms": latency, "detection_s": {k: d.seconds for k, d in detections.items()},
              "timings_s": {"quantize": round(quantized - started, 1), "detect": round(evaluated - quantized, 1),
                            "latency_and_bootstrap": round(time.perf_counter() - evaluated, 1)},
              "load_average": {"start": load, "end": os.getloadavg()}, "cpus": os.cpu_count()}
    suffix = "" if args.runtime == "openvino" else f"-{args.runtime}"
    (args.out / f"heldout_agreement{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(recipes, detections, result)
    (args.out / f"heldout_agreement{suffix}.md").write_text(table)
    print(table)
    print(json.dumps({"timings_s": report["timings_s"], "openvino_latency_ms": latency,
                      "load_average": report["load_average"]}))


if __name__ == "__main__":
    main()
