"""Does OpenVINO's INT8 on a CPU with VNNI/AMX give what onnxruntime's Q/DQ emulation measured? (benchmark)

The INT8 recipes (docs/quantization.md) are measured with onnxruntime, which emulates Q/DQ exactly; the CPU
targets serve INT8 with OpenVINO, whose integer kernels are only right on CPUs with VNNI or AMX (runtime.py). This
runs both runtimes on the SAME letterboxed inputs of one int8-fp32 model, on a machine that has those
instructions (the lent GPU host's CPU), and keeps each runtime's detections for scoring where pycocotools is.
OpenVINO is opened on the given file wherever the CPU flags report VNNI/AMX, with no self-check (`open_exactly`): so
it also measures pairings that yqpack keeps off OpenVINO (the s8 file on VNNI without AMX), which is how the
routing rule of int8_cpu.py was found. benchmarks/int8_isa.py measures what the rule serves.

    # on the VNNI/AMX machine (numpy, opencv, onnxruntime, openvino; no pycocotools needed):
    python benchmarks/openvino_int8_cpu.py detect --model model.int8-fp32.onnx --images DIR --out OUT
    # here: INT8/FP32 mAP50-95 per runtime (FP32 detections computed here), and OpenVINO vs onnxruntime
    PYTHONPATH=. .venv/bin/python benchmarks/openvino_int8_cpu.py score --detections OUT/detections.npz \
        --fp32 build/onnx/model.fp32.onnx --images DIR --annotations ANN.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from packager.inference.letterbox import preprocess, read_image  # noqa: E402
from packager.inference.postprocess import EVAL_THRESHOLDS, postprocess  # noqa: E402
from packager.inference.runtime import (  # noqa: E402
    INT8_FLAGS,
    RuntimeOptions,
    open_exactly,
    read_cpu,
)
from packager.verify.report import cpu_name  # noqa: E402

IMGSZ = (640, 640)
RUNTIMES = {"openvino": RuntimeOptions("openvino"), "onnxruntime": RuntimeOptions("onnxruntime")}


def detect(args) -> None:
    flags, vendor = read_cpu()
    int8 = [name for flag, name in INT8_FLAGS.items() if flag in flags]
    if not int8:
        raise SystemExit("this CPU has no VNNI/AMX: OpenVINO's INT8 would saturate here (runtime.py); nothing to check")
    models = {name: open_exactly(args.model, options) for name, options in RUNTIMES.items()}
    images = sorted(Path(args.images).glob("*.jpg"))
    detections = {name: {} for name in models}
    raw_difference, raw_scale, seconds = [], [], {name: 0.0 for name in models}
    for path in images:
        chw, info = preprocess(read_image(path), IMGSZ)
        raws = {}
        for name, model in models.items():
            started = time.perf_counter()
            raws[name] = model.run(chw[None])[0]
            seconds[name] += time.perf_counter() - started
            detections[name][path.name] = postprocess(raws[name], info, EVAL_THRESHOLDS, "raw")
        raw_difference.append(float(np.abs(raws["openvino"] - raws["onnxruntime"]).max()))
        raw_scale.append(float(np.abs(raws["onnxruntime"]).max()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "detections.npz", **{f"{name}/{image}": dets for name, per_image in detections.items()
                                                    for image, dets in per_image.items()})
    facts = {"cpu": cpu_name(), "vendor": vendor, "int8_instructions": int8, "cores": len(os.sched_getaffinity(0)),
             "images": len(images), "model": Path(args.model).name,
             "versions": {name: _version(name) for name in models},
             "seconds_per_image": {name: round(total / len(images), 4) for name, total in seconds.items()},
             "raw_head_max_abs_difference": {"median": float(np.median(raw_difference)),
                                             "max": float(np.max(raw_difference)),
                                             "output_max_abs": float(np.max(raw_scale))}}
    (out / "facts.json").write_text(json.dumps(facts, indent=1))
    print(json.dumps(facts, indent=1))


def _version(module: str) -> str:
    return getattr(__import__(module), "__version__", "?")


def score(args) -> None:
    from packager.evaluate.onnx_eval import detect_images
    from packager.metrics.coco_eval import CocoGroundTruth, evaluate_images
    from packager.metrics.intervals import paired_difference, paired_ratio

    with np.load(args.detections) as archive:
        by_runtime: dict[str, dict[str, np.ndarray]] = {}
        for key in archive.files:
            runtime, image = key.split("/", 1)
            by_runtime.setdefault(runtime, {})[image] = archive[key]
    names = sorted(next(iter(by_runtime.values())))
    ground_truth = CocoGroundTruth(args.annotations)
    class_names = [c["name"] for c in sorted(ground_truth.coco.dataset["categories"], key=lambda c: c["id"])]
    images = [Path(args.images) / name for name in names]
    fp32 = detect_images(args.fp32, images, IMGSZ, label="fp32 (openvino f32, here)", show_progress=False)
    fp32_eval = evaluate_images(fp32, ground_truth, class_names)
    evaluations = {name: evaluate_images(dets, ground_truth, class_names) for name, dets in by_runtime.items()}
    print(f"{len(names)} images; FP32 mAP50-95 {fp32_eval.metrics.map50_95:.4f}")
    for name, evaluation in evaluations.items():
        ratio = paired_ratio(evaluation.per_image, fp32_eval.per_image, name, "fp32")
        print(f"INT8 {name:12s} mAP50-95 {evaluation.metrics.map50_95:.4f}  INT8/FP32 {ratio.ratio:.4f} "
              f"[{ratio.low:.4f}-{ratio.high:.4f}]")
    difference = paired_difference(evaluations["openvino"].per_image, evaluations["onnxruntime"].per_image,
                                   "openvino", "onnxruntime")
    print(f"openvino - onnxruntime INT8 mAP50-95 {difference.difference:+.4f} "
          f"[{difference.low:+.4f}, {difference.high:+.4f}]")
    same = sum(len(by_runtime["openvino"][n]) == len(by_runtime["onnxruntime"][n]) for n in names)
    print(f"images with the same number of detections (conf 0.001): {same} of {len(names)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    on_device = commands.add_parser("detect", help="run both runtimes (on the VNNI/AMX machine)")
    on_device.add_argument("--model", required=True)
    on_device.add_argument("--images", required=True)
    on_device.add_argument("--out", required=True)
    here = commands.add_parser("score", help="score the detections with pycocotools")
    here.add_argument("--detections", required=True)
    here.add_argument("--fp32", required=True)
    here.add_argument("--images", required=True)
    here.add_argument("--annotations", required=True)
    args = parser.parse_args()
    detect(args) if args.command == "detect" else score(args)


if __name__ == "__main__":
    main()
