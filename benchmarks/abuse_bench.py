"""Good requests under abuse: what bombs, garbage and unbounded parameters cost the served `local` ensemble.

Renders the fp32 `local` repository of a build into a temp dir, starts the embedded tritonserver on free
127.0.0.1 ports and sends, at concurrency 8 (async gRPC, real COCO JPEGs):
  1. a clean phase: good requests only (p50/p99 without abuse);
  2. a solo phase: each abuse kind alone, one request at a time: the round trip bounds its server time;
  3. a mixed phase: good requests interleaved 1:1 with abuse - a 20000x20000 PNG (400 MP in 0.4 MB), garbage
     bytes, a JPEG with 2,000 corrupted bytes, max_det=1e9 with conf 0 / iou 1 / multi_label, an unknown
     parameter, multi_label=5 - reporting status codes per kind, good p50/p99 under abuse, the server time of a
     refused request (Triton's own failure statistics) and server + stub RSS before/after the mixed phase.

Not a test: numbers depend on the machine. Bounded: --good + --mixed requests, each with a 120 s timeout.

    .venv/bin/python benchmarks/abuse_bench.py --build build/yolov8n --good 200 --mixed 2000
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import cv2
import numpy as np
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from packager.core.paths import assets_dir
from packager.verify.loadtest import latency_stats
from packager.verify.report import cpu_name
from packager.repository.render import render_repository
from packager.serve.embedded import LocalTritonServer, find_free_ports
from packager.serve.records import stub_processes
from packager.serve.server_env import ensure_server_env

CONCURRENCY = 8
MODEL = "yolov8n_fp32"


def abuse_payloads(good: bytes) -> dict[str, tuple[bytes, dict | None]]:
    """kind -> (image bytes, request parameters)."""
    corrupt = bytearray(good)
    middle = len(corrupt) // 2
    corrupt[middle : middle + 2000] = np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    return {
        "bomb 20000x20000 PNG": (cv2.imencode(".png", np.zeros((20000, 20000), np.uint8))[1].tobytes(), None),
        "garbage bytes": (np.random.default_rng(1).bytes(4096), None),
        "corrupt JPEG": (bytes(corrupt), None),
        "max_det=1e9, conf 0, iou 1": (good, {"conf_threshold": 0.0, "iou_threshold": 1.0, "max_det": int(1e9),
                                              "multi_label": True}),
        "unknown parameter conf": (good, {"conf": 0.5}),
        "multi_label=5": (good, {"multi_label": 5}),
    }


async def run_stream(url: str, items: list[tuple[str, bytes, dict | None]],
                     concurrency: int = CONCURRENCY) -> list[tuple[str, float, str]]:
    """(kind, seconds, status) per request, `concurrency` in flight."""
    client = aioclient.InferenceServerClient(url)
    results: list[tuple[str, float, str]] = []
    queue = iter(items)

    async def worker() -> None:
        for kind, data, parameters in queue:
            tensor = aioclient.InferInput("IMAGE", [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[data]], dtype=object))
            started = time.perf_counter()
            try:
                await client.infer(MODEL, [tensor], parameters=parameters, client_timeout=120)
                status = "OK"
            except InferenceServerException as error:
                status = str(error.status()).replace("StatusCode.", "")
            results.append((kind, time.perf_counter() - started, status))

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await client.close()
    return results


def rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


async def failure_stats(url: str) -> dict[str, tuple[int, int]]:
    """model -> (failed requests, their total ns) from Triton's statistics."""
    client = aioclient.InferenceServerClient(url)
    try:
        stats = await client.get_inference_statistics(as_json=True)
    finally:
        await client.close()
    out = {}
    for model in stats.get("model_stats", []):
        fail = model.get("inference_stats", {}).get("fail", {})
        out[model["name"]] = (int(fail.get("count", 0)), int(fail.get("ns", 0)))
    return out


def summarize(results, phase: str) -> dict:
    by_kind = defaultdict(list)
    for kind, seconds, status in results:
        by_kind[kind].append((seconds, status))
    summary = {}
    for kind, rows in by_kind.items():
        stats = latency_stats([s for s, _ in rows])
        summary[kind] = {"requests": len(rows), "status": dict(Counter(st for _, st in rows)),
                         "p50_ms": stats.p50_ms, "p99_ms": stats.p99_ms}
        print(f"  {phase:6s} {kind:28s} n={len(rows):5d} p50 {stats.p50_ms:8.1f} ms  p99 {stats.p99_ms:8.1f} ms  "
              f"{dict(Counter(st for _, st in rows))}")
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", type=Path, required=True, help="a yqpack build folder (manifest.json)")
    parser.add_argument("--good", type=int, default=200, help="requests of the clean phase")
    parser.add_argument("--mixed", type=int, default=2000, help="requests of the mixed phase (half abuse)")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    args = parser.parse_args()
    images = sorted((assets_dir() / "coco" / "val2017").glob("*.jpg"))[:32]
    goods = [path.read_bytes() for path in images]
    abuse = abuse_payloads(goods[0])
    good_items = [("good", goods[i % len(goods)], None) for i in range(args.good)]
    kinds = itertools.cycle(abuse.items())
    mixed_items = []
    for index in range(args.mixed):
        if index % 2 == 0:
            mixed_items.append(("good", goods[index // 2 % len(goods)], None))
        else:
            kind, (data, parameters) = next(kinds)
            mixed_items.append((kind, data, parameters))

    with tempfile.TemporaryDirectory(prefix="yqpack-abuse-bench-") as tmp:
        repository = render_repository(args.build, Path(tmp) / "model_repository", target="local",
                                       precisions=("fp32",))
        grpc, http, metrics = find_free_ports(3)
        server = LocalTritonServer(repository.path, ensure_server_env(), grpc_port=grpc, http_port=http,
                                   metrics_port=metrics, log_path=Path(tmp) / "tritonserver.log")
        with server:
            pids = lambda: [server.pid, *stub_processes(server.shm_prefix)]  # noqa: E731
            asyncio.run(run_stream(server.grpc_url, good_items[: 2 * CONCURRENCY]))  # warm-up, not measured
            print(f"{cpu_name()}; concurrency {CONCURRENCY}; {args.good} clean + {args.mixed} mixed requests")
            clean = summarize(asyncio.run(run_stream(server.grpc_url, good_items)), "clean")
            solo_items = [(kind, data, parameters) for kind, (data, parameters) in abuse.items() for _ in range(20)]
            solo = summarize(asyncio.run(run_stream(server.grpc_url, solo_items, concurrency=1)), "solo")
            rss_before = rss_mib(pids())
            failed_before = asyncio.run(failure_stats(server.grpc_url))
            began = time.perf_counter()
            mixed = summarize(asyncio.run(run_stream(server.grpc_url, mixed_items)), "mixed")
            mixed_wall = time.perf_counter() - began
            failed_after = asyncio.run(failure_stats(server.grpc_url))
            rss_after = rss_mib(pids())
    refused = {model: (failed_after[model][0] - failed_before.get(model, (0, 0))[0],
                       failed_after[model][1] - failed_before.get(model, (0, 0))[1]) for model in failed_after}
    server_ms = {model: ns / count / 1e6 for model, (count, ns) in refused.items() if count}
    ratio = mixed["good"]["p99_ms"] / clean["good"]["p99_ms"]
    growth = (rss_after - rss_before) / rss_before * 100
    print(f"good p99 under abuse / without: {ratio:.2f}x; server+stub RSS {rss_before:.0f} -> {rss_after:.0f} MiB "
          f"({growth:+.1f} %) over {args.mixed} mixed requests in {mixed_wall:.0f} s")
    print("server time per refused request (Triton fail statistics, ms): "
          + ", ".join(f"{model} {ms:.2f}" for model, ms in server_ms.items()))
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "clean": clean, "solo": solo, "mixed": mixed,
                                         "p99_ratio": ratio,
                                         "rss_mib": [rss_before, rss_after], "rss_growth_pct": growth,
                                         "refused_server_ms": server_ms, "mixed_wall_s": mixed_wall}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
