"""In-process batch-1 latency per precision per runtime (onnxruntime; OpenVINO with the f32 and bf16 hints),
plus OpenVINO's compile time cold and from its compiled-model cache, and the INT8 layer count it executes.

    PYTHONPATH=. .venv/bin/python benchmarks/runtime_bench.py --build build/yolov8n --json reports/runtime.json

Rounds are interleaved (every model once per round) so drifting load on a shared machine hits all alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from packager.pipeline.manifest import artifact_path
from packager.inference.runtime import RuntimeOptions, int8_isa, open_model, read_cpu_flags
from packager.verify.report import cpu_name

SETTINGS = {
    "onnxruntime": RuntimeOptions("onnxruntime"),
    "openvino f32": RuntimeOptions("openvino", precision_hint="f32"),
    "openvino bf16": RuntimeOptions("openvino", precision_hint="bf16"),
}
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build", type=Path, default=Path("build/yolov8n"))
    parser.add_argument("--variants", default="fp32,fp16,int8-fp32")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per model (median reported)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    batch = np.load(args.build / "calib.npy", mmap_mode="r")[:1].astype(np.float32)
    models, results = {}, {"latency_ms": {}, "compile_s": {}, "int8_layers": {}}
    with tempfile.TemporaryDirectory(prefix="yqpack-ov-cache-") as cache:
        for variant in args.variants.split(","):
            path = artifact_path(args.build, variant)
            for name, options in SETTINGS.items():
                models[(variant, name)] = model = open_model(path, options)
                model.run(batch)  # first inference allocates
            cold = open_model(path, RuntimeOptions("openvino", cache_dir=cache))
            warm = open_model(path, RuntimeOptions("openvino", cache_dir=cache))
            results["compile_s"][variant] = {"onnxruntime": round(models[(variant, "onnxruntime")].compile_seconds, 2),
                                             "openvino": round(cold.compile_seconds, 2),
                                             "openvino from cache": round(warm.compile_seconds, 2)}
            layers = models[(variant, "openvino f32")].layer_precisions()
            results["int8_layers"][variant] = {kind: counts for kind, counts in layers.items()
                                               if "i8" in counts or "u8" in counts}
    timings = {key: [] for key in models}
    for _ in range(args.runs):
        for key, model in models.items():
            start = time.perf_counter()
            model.run(batch)
            timings[key].append(time.perf_counter() - start)
    for (variant, name), values in timings.items():
        results["latency_ms"].setdefault(variant, {})[name] = round(float(np.median(values)) * 1000, 1)
    flags = read_cpu_flags()
    results["machine"] = {"processor": cpu_name(), "cpus": len(os.sched_getaffinity(0)),
                          "platform": platform.platform(), "load_average_1min": round(os.getloadavg()[0], 2),
                          "isa": [flag for flag in ISA_FLAGS if flag in flags], "int8_isa": int8_isa(flags)}
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
