"""Which INT8 recipe keeps >= 99 % of FP32 mAP50-95 on unseen images? (benchmark, not a test)

Every recipe is built from ONE FP32 export and calibration tensors letterboxed from calib2017 (the first N images,
sorted by name, exactly as `yqpack build` takes them); label-free tuning, where a recipe has any, uses calib2017
images only. Each recipe's int8-fp32 twin is then scored on the 640 labelled `val2017-dev` images with onnxruntime
(its Q/DQ emulation is exact; OpenVINO's INT8 kernels saturate on CPUs without VNNI): INT8/FP32 mAP50-95 with a
95 % paired bootstrap interval (1,000 resamples, seed 0), the INT8 share of convolution MACs and the recipe's
build seconds on this machine. FP32 detections are computed once and cached, so are every recipe's model and
detections (delete OUT/<recipe>.* to redo one). `--agreement` adds the label-free agreement with FP32 on the
calib2017 images after the first 192 (never a calibration image of any recipe here that uses <= 192 images).

    PYTHONPATH=. nice .venv/bin/python benchmarks/recipe_frontier.py --out reports/recipe_frontier \
        --recipes max64,entropy256 [--agreement] [--plot docs/img/int8_recipe_frontier.png]

The recipe table and plot in docs/quantization.md come from this script's OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from packager.calibration.calibration import build_calibration, list_images
from packager.core.paths import assets_dir
from packager.evaluate.onnx_eval import detect_images
from packager.inference.runtime import RuntimeOptions
from packager.metrics.coco_eval import CocoGroundTruth, evaluate_images
from packager.metrics.intervals import paired_difference, paired_ratio
from packager.metrics.mac_coverage import conv_coverage
from packager.quantize.int8 import QuantizeOptions, quantize_int8_twins

ORT = RuntimeOptions("onnxruntime")
DEFAULT_RECIPE = "mse64-x12"  # what `yqpack build` does by default (the recipe "default" rebuilds it)
HELD_OUT_START = 192  # calib2017 images [192:] score the label-free agreement; no recipe calibrates on them


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    build: Callable[["Context", Path], dict]  # writes model.int8-fp32.onnx into the folder, returns build facts


class Context:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.fp32 = Path(args.fp32)
        self.calib_files = list_images(args.calib_images)
        self.imgsz = (640, 640)
        self._calibration: dict[int, np.ndarray] = {}

    def calibration(self, count: int) -> np.ndarray:
        """The first `count` calib2017 images through the serving letterbox (cached on disk)."""
        if count not in self._calibration:
            path = self.out / f"calib-{count}.npy"
            if not path.is_file():
                build_calibration(self.args.calib_images, self.imgsz, count, show_progress=False,
                                  files=self.calib_files[:count]).save(path)
            self._calibration[count] = np.load(path)
        return self._calibration[count]


def modelopt_recipe(count: int, method: str, **quantize_options) -> Callable[[Context, Path], dict]:
    """`quantize_int8_twins` as `yqpack build` runs it (preset mixed; the stride-4 stage in INT8 unless asked)."""
    quantize_options.setdefault("stride4_precise", False)

    def build(context: Context, folder: Path) -> dict:
        calibration = context.calibration(count)
        started = time.perf_counter()
        options = QuantizeOptions(calibration_method=method, **quantize_options)
        result = quantize_int8_twins(context.fp32, calibration, folder, options)
        facts = {"calibration_images": count, "method": method, "quantize_s": round(time.perf_counter() - started, 1),
                 "quantized_nodes": result.quantized_nodes, **quantize_options}
        if options.adaround:  # as `yqpack build --adaround` does it, on a GPU when torch sees one
            from packager.quantize.adaround_step import apply_adaround

            apply_adaround(result, context.fp32, calibration, options, show_progress=False)
            facts.update(adaround_s=result.adaround.seconds, adaround_device=result.adaround.device)
        return facts
    return build


RECIPES: dict[str, Recipe] = {}


def recipe(name: str, description: str, build) -> None:
    RECIPES[name] = Recipe(name, description, build)


recipe("max64", "mixed, ModelOpt max calibration, 64 images (the old default)", modelopt_recipe(64, "max"))
recipe("max192", "mixed, max, 192 images", modelopt_recipe(192, "max"))
recipe("entropy64", "mixed, ModelOpt entropy calibration, 64 images", modelopt_recipe(64, "entropy"))
recipe("entropy192", "mixed, entropy, 192 images", modelopt_recipe(192, "entropy"))
recipe("max64-x12", "max64 + the stride-4 stage kept precise (without the MSE scales)",
       modelopt_recipe(64, "max", stride4_precise=True))
recipe("max128-x12", "max64-x12 with 128 calibration images", modelopt_recipe(128, "max", stride4_precise=True))
recipe("mse64", "mixed, max calibration + MSE activation scales, 64 images", modelopt_recipe(64, "mse"))
recipe("mse128", "mixed, max + MSE activation scales, 128 images", modelopt_recipe(128, "mse"))
recipe("mse192", "mixed, max + MSE activation scales, 192 images", modelopt_recipe(192, "mse"))
recipe("mse64-x2", "mse64 + /model.2/ (first C2f) kept precise", modelopt_recipe(64, "mse", exclude_nodes=["/model.2/"]))
recipe("mse64-xs", "mse64 + /model.1/ and /model.2/cv1/ kept precise",
       modelopt_recipe(64, "mse", exclude_nodes=["/model.1/", "/model.2/cv1/"]))
recipe("mse64-x12", "mse64 + /model.1/ and /model.2/ (the stride-4 stage) kept precise",
       modelopt_recipe(64, "mse", exclude_nodes=["/model.1/", "/model.2/"]))
recipe("mse256", "mixed, max + MSE activation scales, 256 images", modelopt_recipe(256, "mse"))
recipe("mse256-x12", "mse64-x12 with 256 calibration images (--calib-size 256; stride-4 stage found by shape)",
       modelopt_recipe(256, "mse", stride4_precise=True))
recipe("mse128-x12", "mse64-x12 with 128 calibration images", modelopt_recipe(128, "mse", stride4_precise=True))
recipe("mse64-x012", "mse64-x12 + /model.0/ (the stem conv) kept precise",
       modelopt_recipe(64, "mse", stride4_precise=True, exclude_nodes=["/model.0/"]))
recipe("default", "the default build: mixed (head, Adds, stride-4 stage precise), mse, 64 images",
       modelopt_recipe(64, "mse", stride4_precise=True))
# --adaround: 1,500 steps per convolution; measured models were made on one H200 (learn_rounding, 109-167 s), the
# CPU would take far longer. A recipe whose folder exists is not rebuilt.
recipe("mse64-ada", "mse64 + AdaRound", modelopt_recipe(64, "mse", adaround=True))
recipe("mse64-xs-ada", "mse64-xs + AdaRound",
       modelopt_recipe(64, "mse", exclude_nodes=["/model.1/", "/model.2/cv1/"], adaround=True))
recipe("mse64-x12-ada", "mse64-x12 + AdaRound", modelopt_recipe(64, "mse", stride4_precise=True, adaround=True))


def detections_cached(path: Path, model: Path, context: Context, images: list[Path], label: str) -> dict:
    if path.is_file():
        with np.load(path) as archive:
            return {name: archive[name] for name in archive.files}
    started = time.perf_counter()
    detections = detect_images(model, images, context.imgsz, label=label, show_progress=False, runtime=ORT)
    np.savez(path, **detections)
    print(f"  {label}: detected {len(images)} images in {time.perf_counter() - started:.0f} s", flush=True)
    return detections


def run(args) -> dict:
    context = Context(args)
    context.out.mkdir(parents=True, exist_ok=True)
    ground_truth = CocoGroundTruth(args.val_annotations)
    val_images = ground_truth.image_files(args.val_images)
    class_names = [c["name"] for c in sorted(ground_truth.coco.dataset["categories"], key=lambda c: c["id"])]
    results_path = context.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"recipes": {}}
    results["machine"] = machine()
    fp32_dets = detections_cached(context.out / "fp32.npz", context.fp32, context, val_images, "fp32")
    fp32_eval = evaluate_images(fp32_dets, ground_truth, class_names)
    results["fp32"] = {"map50_95": fp32_eval.metrics.map50_95, "images": fp32_eval.metrics.images}
    print(f"FP32 mAP50-95 {fp32_eval.metrics.map50_95:.4f} on {len(val_images)} val2017-dev images", flush=True)
    names = args.recipes.split(",")
    if args.recipes == "cached":  # every recipe already measured: re-score only (no quantization, no detection)
        names = [name for name in RECIPES if (context.out / f"{name}.npz").is_file()]
    versus = None
    if args.versus:
        versus = evaluate_images(detections_cached(context.out / f"{args.versus}.npz", Path("-"), context, val_images,
                                                   args.versus), ground_truth, class_names).per_image
    for name in names:
        row = results["recipes"].get(name, {})
        folder = context.out / name
        model = folder / "model.int8-fp32.onnx"
        if not model.is_file():
            started = time.perf_counter()
            facts = RECIPES[name].build(context, folder)
            row = {"description": RECIPES[name].description, **facts,
                   "build_s": round(time.perf_counter() - started, 1)}
        row["int8_mac_coverage"] = round(conv_coverage(model).share("int8"), 5)
        if args.agreement and "agreement" not in row:
            row["agreement"] = agreement(context, model, class_names)
        detections = detections_cached(context.out / f"{name}.npz", model, context, val_images, name)
        evaluation = evaluate_images(detections, ground_truth, class_names)
        interval = paired_ratio(evaluation.per_image, fp32_eval.per_image, name, "fp32")
        row.update({"map50_95": evaluation.metrics.map50_95, "ratio": interval.ratio, "low": interval.low,
                    "high": interval.high, "images": interval.images})
        if versus is not None and name != args.versus:
            difference = paired_difference(evaluation.per_image, versus, name, args.versus)
            row["versus"] = {"recipe": args.versus, "difference": difference.difference, "low": difference.low,
                             "high": difference.high}
        results["recipes"][name] = row
        results_path.write_text(json.dumps(results, indent=1))
        print(f"{name:24s} ratio {interval.ratio:.4f} [{interval.low:.4f}-{interval.high:.4f}]  INT8 MACs "
              f"{row['int8_mac_coverage']:.1%}  build {row.get('build_s', 0):.0f} s"
              + (f"  agreement {row['agreement']:.4f}" if "agreement" in row else "")
              + (f"  vs {args.versus} {row['versus']['difference']:+.4f} [{row['versus']['low']:+.4f}, "
                 f"{row['versus']['high']:+.4f}]" if "versus" in row else "")
              + f"  (peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.1f} GB)", flush=True)
    if args.plot:
        plot(results, Path(args.plot))
    return results


_SCORER = None


def agreement(context: Context, model: Path, class_names: list[str]) -> float:
    """Label-free: COCO mAP50-95 of the recipe's detections against FP32's (score >= 0.25) on held-out calib2017."""
    global _SCORER
    from packager.quantize.sensitivity import AgreementScorer

    if _SCORER is None:
        _SCORER = AgreementScorer(onnx.load(str(context.fp32)), context.calib_files[HELD_OUT_START:], context.imgsz,
                                  class_names)
    return _SCORER.score(onnx.load(str(model))).agreement


def machine() -> dict:
    flags = ""
    if Path("/proc/cpuinfo").is_file():
        text = Path("/proc/cpuinfo").read_text()
        model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
        flag_line = next((line for line in text.splitlines() if line.startswith("flags")), "")
        flags = ",".join(f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
                         if f" {f}" in flag_line)
    else:
        model = platform.processor()
    return {"cpu": model, "cores": os.cpu_count(), "flags": flags, "python": sys.version.split()[0]}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["recipes"]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    at_coverage: dict[float, int] = {}
    for name, row in rows.items():
        if "ratio" not in row:
            continue
        # recipes of one coverage side by side (their x differs by less than a marker otherwise)
        coverage = round(100 * row["int8_mac_coverage"], 2)
        x = coverage + 0.35 * at_coverage.get(coverage, 0)
        at_coverage[coverage] = at_coverage.get(coverage, 0) + 1
        ax.errorbar(x, row["ratio"], yerr=[[row["ratio"] - row["low"]], [row["high"] - row["ratio"]]], fmt="o",
                    capsize=3)
        label = f"{name} (default)" if name == DEFAULT_RECIPE else name
        below = at_coverage[coverage] % 2 == 0  # neighbours' labels above and below their points
        ax.annotate(label, (x, row["ratio"]), textcoords="offset points", xytext=(5, -10 if below else 4),
                    fontsize=8, fontweight="bold" if name == DEFAULT_RECIPE else "normal")
    ax.axhline(0.99, color="red", linestyle="--", linewidth=1, label="0.99 target")
    ax.axvline(90, color="grey", linestyle=":", linewidth=1, label="90 % INT8 MACs")
    ax.set_xlabel("INT8 share of convolution MACs (%)")
    ax.set_ylabel("INT8 / FP32 mAP50-95 (95 % paired bootstrap)")
    ax.set_title(f"yolov8n INT8 recipes on val2017-dev ({results['fp32']['images']} images, onnxruntime)")
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    assets = assets_dir()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fp32", default="/work/baseline/build/onnx/model.fp32.onnx")
    parser.add_argument("--calib-images", default=str(assets / "coco" / "calib2017"))
    parser.add_argument("--val-images", default=str(assets / "coco" / "val2017-dev"))
    parser.add_argument("--val-annotations", default=str(assets / "coco" / "annotations"
                                                         / "instances_val2017_dev640.json"))
    parser.add_argument("--out", default="reports/recipe_frontier")
    parser.add_argument("--recipes", default="max64", help="comma-separated names (see --list), or 'cached'")
    parser.add_argument("--agreement", action="store_true")
    parser.add_argument("--versus", default=None,
                        help="also the paired bootstrap difference of each recipe's mAP50-95 vs this recipe's")
    parser.add_argument("--plot", default=None)
    parser.add_argument("--list", action="store_true", help="list the recipes and exit")
    parser.add_argument("--plot-only", action="store_true", help="redraw --plot from OUT/results.json and exit")
    args = parser.parse_args()
    if args.list:
        for recipe_ in RECIPES.values():
            print(f"{recipe_.name:24s} {recipe_.description}")
        return
    if args.plot_only:
        plot(json.loads((Path(args.out) / "results.json").read_text()), Path(args.plot))
        return
    with tempfile.TemporaryDirectory():
        run(args)


if __name__ == "__main__":
    main()
