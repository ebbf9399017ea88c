"""INT8 as yqpack serves it on each CPU instruction set: speed against FP32 and accuracy against FP32 (benchmark).

For each oneDNN cap this CPU allows (`ONEDNN_MAX_CPU_ISA`: the kernels OpenVINO gives lesser CPUs; none = this
CPU's own), in a subprocess each (oneDNN reads the cap once per process): the detector's batch-1 latency of FP32
(OpenVINO f32) and of INT8 as the routing rule picks it (inference/int8_cpu.py: OpenVINO s8 on AMX, OpenVINO u8 on
VNNI, onnxruntime without VNNI), interleaved rounds, median; then INT8/FP32 mAP50-95 with its paired bootstrap
interval on the labelled images (default: the 640 val2017-dev), and INT8 on onnxruntime's exact emulation for
comparison (once: onnxruntime does not use oneDNN).

    PYTHONPATH=. .venv/bin/python benchmarks/int8_isa.py --build build/yolov8n --json reports/int8_isa.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from packager.core.paths import assets_dir  # noqa: E402
from packager.inference.int8_cpu import AMX, AVX512_VNNI, AVX_VNNI, int8_isa_in_effect  # noqa: E402
from packager.inference.runtime import read_cpu_flags  # noqa: E402
from packager.verify.report import cpu_name  # noqa: E402

# cap -> the INT8 instruction set it needs on this CPU to mean what its name says (None: none needed)
CAPS = {"": None, "AVX512_CORE_AMX": AMX, "AVX512_CORE_VNNI": AVX512_VNNI, "AVX2_VNNI": AVX_VNNI,
        "AVX512_CORE": None, "AVX2": None}
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


def measure(args) -> dict:
    """One cap (this process's environment): latency and detections of FP32 and of INT8 as the rule picks it."""
    from packager.core.manifest import BuildManifest
    from packager.evaluate.onnx_eval import detect_with, open_variant
    from packager.inference.runtime import RuntimeOptions

    manifest = BuildManifest.load(args.build)
    models = {"fp32": open_variant(args.build, manifest, "fp32"),
              "int8": open_variant(args.build, manifest, "int8-fp32")}
    if args.onnxruntime:
        models["int8 onnxruntime"] = open_variant(args.build, manifest, "int8-fp32", RuntimeOptions("onnxruntime"))
    batch = np.ascontiguousarray(np.load(manifest.artifact_path(args.build, "calib"), mmap_mode="r")[:1], np.float32)
    times = {name: [] for name in models}
    for model in models.values():
        model.run(batch)  # first inference allocates
    for _ in range(args.runs):
        for name, model in models.items():
            started = time.perf_counter()
            model.run(batch)
            times[name].append(time.perf_counter() - started)
    images = sorted(Path(args.images).glob("*.jpg"))[: args.max_images]
    out = {"latency_ms": {name: round(float(np.median(t)) * 1000, 1) for name, t in times.items()},
           "runtime": {name: model.label for name, model in models.items()},
           "notes": {name: list(model.choice.notes) for name, model in models.items()}}
    detections = {name: detect_with(model, images, manifest.model.imgsz, show_progress=False,
                                    head_format=manifest.model.head) for name, model in models.items()}
    np.savez_compressed(args.detections, **{f"{name}|{file}": dets for name, per in detections.items()
                                            for file, dets in per.items()})
    return out


def score(detections_file: Path, names: list[str], annotations: Path, class_names: list[str]) -> dict:
    from packager.metrics.coco_eval import CocoGroundTruth, evaluate_images
    from packager.metrics.intervals import paired_ratio

    stored = np.load(detections_file)
    per_variant: dict[str, dict[str, np.ndarray]] = {name: {} for name in names}
    for key in stored.files:
        name, file = key.split("|", 1)
        per_variant[name][file] = stored[key]
    truth = CocoGroundTruth(annotations)
    results = {name: evaluate_images(dets, truth, class_names) for name, dets in per_variant.items()}
    scores = {name: {"map50_95": round(r.metrics.map50_95, 4), "images": r.metrics.images}
              for name, r in results.items()}
    for name in names:
        if name != "fp32":
            interval = paired_ratio(results[name].per_image, results["fp32"].per_image, name, "fp32")
            scores[name]["ratio_vs_fp32"] = [round(interval.ratio, 4), round(interval.low, 4), round(interval.high, 4)]
    return scores


def main() -> None:
    default_images = assets_dir() / "coco" / "val2017-dev"
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build", type=Path, default=Path("build/yolov8n"))
    parser.add_argument("--images", type=Path, default=default_images)
    parser.add_argument("--annotations", type=Path,
                        default=assets_dir() / "coco" / "annotations" / "instances_val2017_dev640.json")
    parser.add_argument("--max-images", type=int, default=640)
    parser.add_argument("--runs", type=int, default=30, help="timed batch-1 runs per model and cap (median)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one-cap", action="store_true", help=argparse.SUPPRESS)  # the per-cap subprocess
    parser.add_argument("--onnxruntime", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--detections", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_cap:
        print(json.dumps(measure(args)))
        return
    from packager.core.manifest import BuildManifest

    class_names = list(BuildManifest.load(args.build).model.class_names)
    flags = read_cpu_flags()
    report = {"machine": {"processor": cpu_name(), "cpus": len(os.sched_getaffinity(0)),
                          "isa": [flag for flag in ISA_FLAGS if flag in flags],
                          "load_average_1min": round(os.getloadavg()[0], 2)},
              "images": str(args.images), "caps": {}}
    first = True
    for cap, needed in CAPS.items():
        if needed is not None and int8_isa_in_effect(flags, cap) != needed:
            report["caps"][cap] = {"skipped": f"this CPU has no {needed}"}
            continue
        detections = Path(f"/tmp/yqpack-int8-isa-{os.getpid()}-{cap or 'none'}.npz")
        command = [sys.executable, __file__, "--one-cap", "--build", str(args.build), "--images", str(args.images),
                   "--max-images", str(args.max_images), "--runs", str(args.runs), "--detections", str(detections)]
        env = {key: value for key, value in os.environ.items() if key != "ONEDNN_MAX_CPU_ISA"}
        if cap:
            env["ONEDNN_MAX_CPU_ISA"] = cap
        done = subprocess.run(command + (["--onnxruntime"] if first else []), env=env, capture_output=True,
                              text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        names = ["fp32", "int8"] + (["int8 onnxruntime"] if first else [])
        row["accuracy"] = score(detections, names, args.annotations, class_names)
        latency = row["latency_ms"]
        row["int8_speedup_vs_fp32"] = round(latency["fp32"] / latency["int8"], 2)
        detections.unlink(missing_ok=True)
        report["caps"][cap or "none"] = row
        first = False
        print(f"{cap or 'none':18s} fp32 {latency['fp32']:6.1f} ms  int8 {latency['int8']:6.1f} ms "
              f"({row['int8_speedup_vs_fp32']:.2f}x) on {row['runtime']['int8']}; INT8/FP32 "
              f"{row['accuracy']['int8']['ratio_vs_fp32']}", flush=True)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
