"""How wide is the paired bootstrap interval of mAP50-95 ratios, and how many images would +-0.5 % need?

Runs each variant of a build over the annotated images once (or loads those detections from --cache), then for
random subsets of n images computes the 95 % interval of variant/fp32 and fits width = c / sqrt(n); the image
count for a +-0.5 % interval (width 0.01) is the extrapolation n = (c / 0.01)^2. Also times 1,000 resamples.

    python benchmarks/bootstrap_bench.py --build build/yolov8n --images val2017 --annotations ann.json \
        --variants int8-fp32,fp16 [--cache dets.pkl]
"""

from __future__ import annotations

import argparse
import json
import pickle
import time
from pathlib import Path

import numpy as np

from packager.metrics.intervals import paired_ratio
from packager.metrics.coco_eval import CocoGroundTruth, evaluate_images
from packager.core.manifest import BuildManifest
from packager.evaluate.onnx_eval import detect_with, open_variant


def detections(build: Path, files: list[Path], variants: list[str], cache: Path | None) -> dict:
    cached = pickle.loads(cache.read_bytes()) if cache and cache.is_file() else {}
    manifest = BuildManifest.load(build)
    for variant in variants:
        if variant not in cached:
            cached[variant] = detect_with(open_variant(build, manifest, variant), files, manifest.model.imgsz,
                                          label=variant, head_format=manifest.model.head)
            if cache:
                cache.write_bytes(pickle.dumps(cached))
    return cached


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--build", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--annotations", type=Path, required=True)
    parser.add_argument("--variants", default="fp16,int8-fp32")
    parser.add_argument("--cache", type=Path)
    parser.add_argument("--subsets", default="16,32,64,128")
    parser.add_argument("--draws", type=int, default=10, help="random subsets per size")
    args = parser.parse_args()
    ground_truth = CocoGroundTruth(args.annotations)
    files = ground_truth.image_files(args.images)
    variants = [v for v in args.variants.split(",") if v]
    dets = detections(args.build, files, ["fp32", *variants], args.cache)
    names = list(BuildManifest.load(args.build).model.class_names)
    sizes = [int(n) for n in args.subsets.split(",")]
    rng = np.random.default_rng(0)
    report = {}
    reference = evaluate_images(dets["fp32"], ground_truth, names).per_image
    for variant in variants:
        candidate = evaluate_images(dets[variant], ground_truth, names).per_image
        started = time.perf_counter()
        interval = paired_ratio(candidate, reference, variant, "fp32", resamples=1000, seed=0)
        seconds = time.perf_counter() - started  # includes the one-off precomputation for both models
        widths = {}
        for n in sizes:
            # A subset = weights 0 elsewhere: identical to evaluating only those images (see paired_ratio).
            widths[n] = [paired_ratio(candidate, reference, resamples=1000, seed=draw,
                                      subset=rng.choice(len(files), n, replace=False)).width
                         for draw in range(args.draws if n < len(files) else 1)]
        mean = {n: float(np.mean(w)) for n, w in widths.items()}
        # least squares fit of width = c / sqrt(n)
        x = np.array([1 / np.sqrt(n) for n in sizes])
        y = np.array([mean[n] for n in sizes])
        c = float(x @ y / (x @ x))
        report[variant] = {"mean_width": mean, "c": c, "images_for_pm_0.5pct": int(np.ceil((c / 0.01) ** 2)),
                           "full_set": interval.as_dict(), "seconds_1000_resamples_full_set": round(seconds, 2)}
        print(json.dumps({variant: report[variant]}, indent=1))


if __name__ == "__main__":
    main()
