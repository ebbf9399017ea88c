"""Served throughput of the local ensemble vs the bare detector in-process (the ceiling).

Renders the `local` repository of a build (one or more precisions, one runtime) into a temp dir, starts the
embedded tritonserver on free ports and measures, at concurrency 1, 4, 8 (async gRPC client, real COCO JPEGs):
  - the ensemble (bytes -> preprocess -> detector -> postprocess) images/s, p50/p99 latency;
  - the bare served detector (pre-letterboxed tensors in) for the serving overhead of the detector alone;
  - the bare detector in this process with the same runtime, batch 1, same ONNX, thread count and instances: the
    ceiling; and the whole pipeline in this process (decode + letterbox, detector, NMS one after another, the same
    functions the served steps call): what serving adds beyond the work itself;
  - time per request inside preprocess / detector / postprocess from Triton's statistics.
Precisions are interleaved round by round, so ratios between them (INT8 vs FP32) come from one run.

    .venv/bin/python benchmarks/serve_bench.py --build .yqpack/dev-build/yolov8n --precision fp32,int8 --runtime openvino
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import tritonclient.grpc.aio as aioclient

from packager.core.paths import assets_dir
from packager.inference.letterbox import preprocess_bytes
from packager.verify.loadtest import TritonLoad, latency_stats, step_timings
from packager.inference.postprocess import PRODUCTION_THRESHOLDS, postprocess
from packager.verify.report import cpu_name
from packager.repository.render import render_repository
from packager.repository.targets import detector_name
from packager.inference.runtime import DEFAULT_RUNTIME, RUNTIMES, CompiledModel, RuntimeOptions, open_model
from packager.serve.embedded import LocalTritonServer, find_free_ports
from packager.serve.server_env import MALLOC_ENV, ensure_server_env


class InProcessDetector:
    """The ceiling: the bare detector in this process, batch 1, same runtime and settings as served - with N served
    instances, as many compiled models as requests can keep busy (min(N, concurrency)), side by side in threads
    (the runtimes release the GIL) - with the better thread setting of the two (onnxruntime: spinning on/off;
    OpenVINO: threads pinned to cores or not)."""

    def __init__(self, onnx_path: Path, tensors: list[np.ndarray], options: RuntimeOptions, instances: int = 1):
        self.tensors = tensors
        knob = "allow_spinning" if options.runtime == "onnxruntime" else "cpu_pinning"
        probes = {
            on: [open_model(onnx_path, RuntimeOptions(**{**vars(options), knob: on})) for _ in range(instances)]
            for on in (True, False)
        }
        for models in probes.values():
            for model in models:
                model.run(tensors[0][None])  # first run allocates
        timings = {on: self.run(len(tensors) // 4 or 1, 1, models)[1] for on, models in probes.items()}
        self.setting = f"{knob}={min(timings, key=timings.get)}"  # which wins depends on the machine's other load
        self.models = probes[min(timings, key=timings.get)]

    def run(self, count: int, level: int, models: list[CompiledModel] | None = None,
            pipeline=None) -> tuple[list[float], float]:
        """`count` runs at concurrency `level`, shared among the instances it keeps busy, each instance's runs back
        to back (as a served instance under load); returns every run's latency and the wall time of all.
        `pipeline(model, i)`, if given, is one whole image's work instead of the bare detector's."""
        models = (models or self.models)[:level]
        latencies: list[float] = []

        def one_instance(model: CompiledModel, indices: range) -> None:
            for i in indices:
                begin = time.perf_counter()
                if pipeline is None:
                    model.run_borrowed(self.tensors[i % len(self.tensors)][None])  # as the served detector runs it
                else:
                    pipeline(model, i)
                latencies.append(time.perf_counter() - begin)

        start = time.perf_counter()
        with ThreadPoolExecutor(len(models)) as pool:
            list(pool.map(one_instance, models, [range(k, count, len(models)) for k in range(len(models))]))
        return latencies, time.perf_counter() - start


async def served(url: str, model: str, make_inputs, count: int, concurrency: int) -> tuple[list[float], float]:
    """`count` requests kept `concurrency` in flight (yqpack's own load driver); returns latencies and wall time."""
    load = TritonLoad(url)
    try:
        await load.drive(model, make_inputs, concurrency=concurrency, requests=concurrency)  # warm connection + model
        outcomes, wall = await load.drive(model, make_inputs, concurrency=concurrency, requests=count)
    finally:
        await load.close()
    errors = [outcome.error for outcome in outcomes if outcome.error is not None]
    if errors:
        raise SystemExit(f"{len(errors)} failed request(s) on {model}, e.g. {errors[0]}")
    return [outcome.latency_s for outcome in outcomes], wall


def _summary(runs: list[tuple[list[float], float]]) -> dict:
    latencies, wall = [lat for run in runs for lat in run[0]], sum(run[1] for run in runs)
    stats = latency_stats(latencies)
    return {
        "requests": stats.count,
        "images_per_s": round(stats.count / wall, 2),
        "p50_ms": round(stats.p50_ms, 1),
        "p99_ms": round(stats.p99_ms, 1),
    }


async def statistics(url: str) -> dict:
    load = TritonLoad(url)
    try:
        return await load.statistics()
    finally:
        await load.close()


def _per_request_ms(before: dict, after: dict, models: list[str]) -> dict:
    """Mean ms per request inside each model between two statistics snapshots: compute (split into Triton's
    input / infer / output phases: for the Python backend input and output include the stub's shared-memory IPC),
    queue, and the mean batch. A detector's figures mix its bare requests and the ensemble's."""
    return {
        step.model: {"compute_ms": round(step.compute_ms, 2), "queue_ms": round(step.queue_ms, 2),
                     "input_infer_output_ms": [round(step.compute_input_ms, 2), round(step.compute_infer_ms, 2),
                                               round(step.compute_output_ms, 2)],
                     "avg_batch": round(step.avg_batch, 2)}
        for step in step_timings(before, after, models)
    }


class PrecisionBench:
    """One precision's ensemble, bare served detector and in-process ceiling, measured in interleaved rounds."""

    def __init__(self, repo, precision: str, encoded: list[bytes], options: RuntimeOptions, instances: int):
        self.precision, self.encoded = precision, encoded
        self.ensemble, self.detector = repo.ensembles[precision], detector_name(repo.model_name, precision)
        index = json.loads((repo.path / "yqpack_repository.json").read_text())
        self.imgsz, self.head_format = tuple(index["imgsz"]), index["head_format"]
        self.tensors = [preprocess_bytes(data, self.imgsz)[0] for data in encoded]
        self.ceiling = InProcessDetector(
            repo.path / self.detector / "1" / "model.onnx", self.tensors, options, instances
        )
        self.runs = {"ceiling": [], "pipeline": [], "detector": [], "ensemble": []}

    def ensemble_inputs(self, i):
        image = aioclient.InferInput("IMAGE", [1, 1], "BYTES")
        image.set_data_from_numpy(np.array([[self.encoded[i % len(self.encoded)]]], dtype=object))
        return [image]

    def detector_inputs(self, i):
        tensor = aioclient.InferInput("images", [1, *self.tensors[0].shape], "FP32")
        tensor.set_data_from_numpy(self.tensors[i % len(self.tensors)][None])
        return [tensor]

    def pipeline(self, model: CompiledModel, i: int) -> None:
        """One image the whole way in this process, as the ensemble's three steps do it: decode + letterbox,
        detector, decode + NMS with the served default thresholds."""
        tensor, info = preprocess_bytes(self.encoded[i % len(self.encoded)], self.imgsz)
        postprocess(model.run_borrowed(tensor[None])[0], info, PRODUCTION_THRESHOLDS, self.head_format)

    def round(self, url: str, chunk: int, level: int) -> None:
        self.runs["ceiling"].append(self.ceiling.run(chunk, level))
        self.runs["pipeline"].append(self.ceiling.run(chunk, level, pipeline=self.pipeline))
        self.runs["detector"].append(asyncio.run(served(url, self.detector, self.detector_inputs, chunk, level)))
        self.runs["ensemble"].append(asyncio.run(served(url, self.ensemble, self.ensemble_inputs, chunk, level)))

    def summary(self) -> dict:
        ceiling, pipeline, bare, full = (
            _summary(self.runs[key]) for key in ("ceiling", "pipeline", "detector", "ensemble")
        )
        self.runs = {key: [] for key in self.runs}
        return {"ceiling_in_process": ceiling, "ceiling_setting": self.ceiling.setting,
                "pipeline_in_process": pipeline, "served_detector": bare, "ensemble": full,
                "ensemble_vs_ceiling": round(full["images_per_s"] / ceiling["images_per_s"], 3),
                "ensemble_vs_pipeline": round(full["images_per_s"] / pipeline["images_per_s"], 3)}


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build", type=Path, default=Path("build/yolov8n"), help="build directory (manifest.json)")
    parser.add_argument("--precision", default="int8", help="comma-separated: fp32, fp16, int8")
    parser.add_argument("--runtime", default=DEFAULT_RUNTIME, choices=RUNTIMES, help="the local detector's runtime")
    parser.add_argument("--precision-hint", default="f32", choices=("f32", "bf16"), help="OpenVINO only")
    parser.add_argument("--requests", type=int, default=96, help="requests per concurrency level")
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--images", type=int, default=32, help="distinct COCO images cycled through")
    parser.add_argument("--threads", type=int, default=0, help="detector intra-op threads (0: all cores)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds per concurrency level")
    parser.add_argument("--preprocess-instances", type=int, default=None, help="default: per target")
    parser.add_argument("--detector-instances", type=int, default=1,
                        help="served detector instances (with --threads: e.g. 2 x 1 thread instead of 1 x 2)")
    parser.add_argument("--max-queue-delay-us", type=int, default=None, help="default: per target")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args()


def main() -> None:
    if any(name not in os.environ for name in MALLOC_ENV):
        # The server runs with these malloc settings; the in-process ceiling gets them too (read at process start).
        os.execve(sys.executable, [sys.executable, *sys.argv], {**MALLOC_ENV, **os.environ})
    args = _arguments()
    cv2.setNumThreads(1)  # as the served preprocess: the in-process pipeline does the same work the same way
    levels, precisions = [int(c) for c in args.concurrency.split(",")], args.precision.split(",")
    options = RuntimeOptions(args.runtime, args.precision_hint, threads=args.threads)
    encoded = [p.read_bytes() for p in sorted((assets_dir() / "coco" / "val2017").glob("*.jpg"))[: args.images]]
    results = {"runtime": options.runtime, "precision_hint": options.precision_hint, "levels": {}}
    with tempfile.TemporaryDirectory(prefix="yqpack-serve-bench-") as tmp:
        repo = render_repository(
            args.build, Path(tmp) / "model_repository", target="local", precisions=tuple(precisions),
            preprocess_instances=args.preprocess_instances, max_queue_delay_us=args.max_queue_delay_us,
            detector_instances=args.detector_instances,
            intra_op_threads=args.threads, runtime=options.runtime, precision_hint=options.precision_hint,
        )
        grpc_port, http_port, metrics_port = find_free_ports(3)
        server = LocalTritonServer(
            repo.path, ensure_server_env(), grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port,
            log_path=Path(tmp) / "server.log",
        )
        started = time.perf_counter()
        with server:
            results["server_ready_s"] = round(time.perf_counter() - started, 1)  # compile time included
            pre, post = f"{repo.model_name}_preprocess", f"{repo.model_name}_postprocess"
            benches = [
                PrecisionBench(repo, precision, encoded, options, args.detector_instances) for precision in precisions
            ]
            for level in levels:
                # Interleaved rounds: on a shared machine the load drifts, and every measurement should see the same.
                chunk = max(args.requests // args.rounds, level)
                before = asyncio.run(statistics(server.grpc_url))
                for _ in range(args.rounds):
                    for bench in benches:
                        bench.round(server.grpc_url, chunk, level)
                after = asyncio.run(statistics(server.grpc_url))
                row = {bench.precision: bench.summary() for bench in benches}
                row["load_average_1min"] = round(os.getloadavg()[0], 2)
                steps = [pre, *(bench.detector for bench in benches), post]
                row["server_steps_ms"] = _per_request_ms(before, after, steps)
                results["levels"][level] = row
                print(f"c={level}: {json.dumps(row)}", flush=True)
    results["machine"] = {"cpus": _cpu_count(), "platform": platform.platform(), "processor": cpu_name()}
    results["settings"] = {k: str(v) for k, v in vars(args).items()}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
