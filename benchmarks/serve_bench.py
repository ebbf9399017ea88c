"""Served throughput of the local ensemble vs the bare detector in-process (the ceiling).

Renders the `local` repository of a build into a temp dir, starts the embedded tritonserver on free ports and
measures, at concurrency 1, 4, 8 (async gRPC client, real COCO JPEGs):
  - the ensemble (bytes -> preprocess -> detector -> postprocess) images/s, p50/p99 latency;
  - the bare served detector (pre-letterboxed tensors in) for the serving overhead of the detector alone;
  - the bare detector in this process with onnxruntime, batch 1, same ONNX and thread count: the ceiling;
  - time per request inside preprocess / detector / postprocess from Triton's statistics.

    .venv/bin/python benchmarks/serve_bench.py --build .yqpack/dev-build/yolov8n --precision int8
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
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tritonclient.grpc.aio as aioclient

from packager.assets import assets_dir
from packager.letterbox import preprocess_bytes
from packager.loadtest import TritonLoad, latency_stats, step_timings
from packager.report import cpu_name
from packager.repository import detector_name, render_repository
from packager.serve import LocalTritonServer, find_free_ports
from packager.server_env import MALLOC_ENV, ensure_server_env


class InProcessDetector:
    """The ceiling: the bare detector in this process, batch 1, with the better onnxruntime spinning setting."""

    def __init__(self, onnx_path: Path, tensors: list[np.ndarray], threads: int):
        self.tensors = tensors
        probes = {spinning: self._session(onnx_path, threads, spinning) for spinning in ("1", "0")}
        timings = {spinning: self.run(len(tensors) // 4 or 1, session)[1] for spinning, session in probes.items()}
        self.spinning = min(timings, key=timings.get)  # which wins depends on the machine's other load
        self.session = probes[self.spinning]

    @staticmethod
    def _session(onnx_path: Path, threads: int, spinning: str) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        session.run(None, {name: np.zeros((1, *(d for d in session.get_inputs()[0].shape[1:])), np.float32)})
        return session

    def run(self, count: int, session: ort.InferenceSession | None = None) -> tuple[list[float], float]:
        session = session or self.session
        name = session.get_inputs()[0].name
        latencies, start = [], time.perf_counter()
        for i in range(count):
            begin = time.perf_counter()
            session.run(None, {name: self.tensors[i % len(self.tensors)][None]})
            latencies.append(time.perf_counter() - begin)
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
    """Mean ms per request inside each model (compute; queue) between two statistics snapshots."""
    return {
        step.model: {"compute_ms": round(step.compute_ms, 2), "queue_ms": round(step.queue_ms, 2)}
        for step in step_timings(before, after, models)
    }


def main() -> None:
    if any(name not in os.environ for name in MALLOC_ENV):
        # The server runs with these malloc settings; the in-process ceiling gets them too (read at process start).
        os.execve(sys.executable, [sys.executable, *sys.argv], {**MALLOC_ENV, **os.environ})
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build", type=Path, default=Path("build/yolov8n"), help="build directory (manifest.json)")
    parser.add_argument("--precision", default="int8", choices=("fp32", "fp16", "int8"))
    parser.add_argument("--requests", type=int, default=96, help="requests per concurrency level")
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--images", type=int, default=32, help="distinct COCO images cycled through")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds per concurrency level")
    parser.add_argument("--preprocess-instances", type=int, default=None, help="default: per target")
    parser.add_argument("--max-queue-delay-us", type=int, default=None, help="default: per target")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    paths = sorted((assets_dir() / "coco" / "val2017").glob("*.jpg"))[: args.images]
    encoded = [p.read_bytes() for p in paths]
    with tempfile.TemporaryDirectory(prefix="yqpack-serve-bench-") as tmp:
        repo = render_repository(
            args.build, Path(tmp) / "model_repository", target="local", precisions=(args.precision,),
            preprocess_instances=args.preprocess_instances, max_queue_delay_us=args.max_queue_delay_us,
            intra_op_threads=args.threads,
        )
        ensemble, detector = repo.ensembles[args.precision], detector_name(repo.model_name, args.precision)
        onnx_path = repo.path / detector / "1" / "model.onnx"
        imgsz = tuple(json.loads((repo.path / "yqpack_repository.json").read_text())["imgsz"])
        tensors = [preprocess_bytes(data, imgsz)[0] for data in encoded]

        def ensemble_inputs(i):
            image = aioclient.InferInput("IMAGE", [1, 1], "BYTES")
            image.set_data_from_numpy(np.array([[encoded[i % len(encoded)]]], dtype=object))
            return [image]

        def detector_inputs(i):
            tensor = aioclient.InferInput("images", [1, *tensors[0].shape], "FP32")
            tensor.set_data_from_numpy(tensors[i % len(tensors)][None])
            return [tensor]

        results = {"ceiling_in_process": {}, "served_detector": {}, "ensemble": {}, "ensemble_vs_ceiling": {}}
        grpc_port, http_port, metrics_port = find_free_ports(3)
        server = LocalTritonServer(
            repo.path, ensure_server_env(), grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port,
            log_path=Path(tmp) / "server.log",
        )
        with server:
            pre, post = f"{repo.model_name}_preprocess", f"{repo.model_name}_postprocess"
            ceiling_detector = InProcessDetector(onnx_path, tensors, args.threads)
            results["ceiling_spinning"] = ceiling_detector.spinning == "1"
            for level in levels:
                # Interleaved rounds: on a shared machine the load drifts, and all three should see the same.
                chunk = max(args.requests // args.rounds, level)
                runs = {"ceiling": [], "detector": [], "ensemble": []}
                before = asyncio.run(statistics(server.grpc_url))
                for _ in range(args.rounds):
                    runs["ceiling"].append(ceiling_detector.run(chunk))
                    runs["detector"].append(
                        asyncio.run(served(server.grpc_url, detector, detector_inputs, chunk, level))
                    )
                    runs["ensemble"].append(
                        asyncio.run(served(server.grpc_url, ensemble, ensemble_inputs, chunk, level))
                    )
                after = asyncio.run(statistics(server.grpc_url))
                ceiling, bare, full = (_summary(runs[key]) for key in ("ceiling", "detector", "ensemble"))
                results["ceiling_in_process"][level] = ceiling
                results["served_detector"][level] = bare
                results["ensemble"][level] = full
                results["ensemble_vs_ceiling"][level] = round(full["images_per_s"] / ceiling["images_per_s"], 3)
                results.setdefault("load_average_1min", {})[level] = round(os.getloadavg()[0], 2)
                results.setdefault("pre_post_ms", {})[level] = _per_request_ms(before, after, [pre, post])
                print(f"c={level}: ceiling {ceiling} | served detector {bare} | ensemble {full} "
                      f"| ensemble/ceiling {results['ensemble_vs_ceiling'][level]:.1%} "
                      f"| pre/post per request {results['pre_post_ms'][level]}")
    results["machine"] = {"cpus": _cpu_count(), "platform": platform.platform(), "processor": cpu_name()}
    results["settings"] = {k: str(v) for k, v in vars(args).items()}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
