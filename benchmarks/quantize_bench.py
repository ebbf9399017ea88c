"""Quantization benchmark (not a test): accuracy, onnxruntime CPU latency, quantization time and memory.

Runs the real `yqpack build` CLI in subprocesses (so peak memory is that process's own), then evaluates:
FP32 / FP16 / INT8-mixed / INT8-extreme mAP50-95 and mAP50 on the val images, onnxruntime CPU latency at batch 1
(median of --runs), and build wall time, ModelOpt quantization wall time and peak RSS for each calibration size.

    .venv/bin/python benchmarks/quantize_bench.py            # sample assets, writes reports/quantize_bench/

Numbers depend on the machine and on its load: record both with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from packager.core.paths import assets_dir
from packager.core.manifest import BuildManifest
from packager.pipeline.manifest import artifact_path
from packager.evaluate.onnx_eval import evaluate_build, onnx_session


def build(model: Path, calib: Path, out: Path, calib_size: int, preset: str) -> dict:
    """One `yqpack build` in a child process: wall time and the child's peak RSS."""
    command = [sys.executable, "-m", "packager.cli.main", "build", "--model", str(model), "--calib-images", str(calib),
               "--calib-size", str(calib_size), "--preset", preset, "--out", str(out)]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"build failed: {' '.join(command)}\n{process.stderr.read()[-3000:]}")
    manifest = BuildManifest.load(out)
    return {
        "preset": preset,
        "calib_images": calib_size,
        "build_wall_s": round(wall, 1),
        "quantize_wall_s": manifest.quantization.wall_time_s,
        "peak_rss_mb": round(usage.ru_maxrss / 1024),  # Linux reports KiB
    }


def latency_ms(model_path: Path, imgsz, runs: int, warmup: int = 3) -> float:
    session = onnx_session(model_path)
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).random((1, 3, *imgsz), dtype=np.float32)
    for _ in range(warmup):
        session.run(None, {name: x})
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, {name: x})
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 1)


def main() -> None:
    assets = assets_dir()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=assets / "weights" / "yolov8n.pt")
    parser.add_argument("--calib-images", type=Path, default=assets / "coco" / "calib2017")
    parser.add_argument("--val-images", type=Path, default=assets / "coco" / "val2017")
    parser.add_argument("--val-annotations", type=Path,
                        default=assets / "coco" / "annotations" / "instances_val2017_128.json")
    parser.add_argument("--calib-sizes", default="64,256")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("reports/quantize_bench"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.calib_sizes.split(",")]

    builds = {}
    for size in sizes:
        builds[f"mixed-{size}"] = (args.out / f"build-mixed-{size}", build(
            args.model, args.calib_images, args.out / f"build-mixed-{size}", size, "mixed"))
        print(f"built mixed-{size}: {builds[f'mixed-{size}'][1]}", flush=True)
    builds["extreme"] = (args.out / "build-extreme", build(
        args.model, args.calib_images, args.out / "build-extreme", sizes[0], "extreme"))
    print(f"built extreme: {builds['extreme'][1]}", flush=True)

    main_build = builds[f"mixed-{sizes[0]}"][0]
    imgsz = BuildManifest.load(main_build).model.imgsz
    # (row label, build dir, variant)
    rows = [("FP32", main_build, "fp32"), ("FP16 (AutoCast)", main_build, "fp16")]
    rows += [(f"INT8 mixed, {s} calib (int8-fp32)", builds[f"mixed-{s}"][0], "int8-fp32") for s in sizes]
    rows += [(f"INT8 mixed, {sizes[0]} calib (int8 fp16-mixed, CPU truncation)", main_build, "int8")]
    rows += [(f"INT8 extreme, {sizes[0]} calib (int8-fp32)", builds["extreme"][0], "int8-fp32")]
    results = []
    for label, build_dir, variant in rows:
        metrics = evaluate_build(build_dir, args.val_images, args.val_annotations, (variant,))[variant]
        latency = latency_ms(artifact_path(build_dir, variant), imgsz, args.runs)
        results.append({"model": label, "variant": variant, "map50_95": round(metrics.map50_95, 4),
                        "map50": round(metrics.map50, 4), "latency_ms_b1": latency})
        print(results[-1], flush=True)

    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "python": platform.python_version(), "load_avg_1m_at_end": round(os.getloadavg()[0], 2)}
    report = {"machine": machine, "accuracy_latency": results, "quantization": [b[1] for b in builds.values()]}
    (args.out / "quantize_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| model | mAP50-95 | mAP50 | ORT CPU latency b1 (ms, median) |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['map50_95']:.4f} | {r['map50']:.4f} | {r['latency_ms_b1']} |" for r in results]
    lines += ["", "| build | calib images | build wall (s) | ModelOpt quantize wall (s) | peak RSS (MB) |",
              "|---|---|---|---|---|"]
    lines += [f"| {b['preset']} | {b['calib_images']} | {b['build_wall_s']} | {b['quantize_wall_s']} | {b['peak_rss_mb']} |"
              for b in report["quantization"]]
    lines += ["", f"Machine: {machine}"]
    (args.out / "quantize_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
