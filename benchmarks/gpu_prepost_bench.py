"""Host CPU per served image of the `gpu` target's host-side steps: today's Python path vs DALI + in-graph NMS.

Renders the gpu repository of a build twice (`--preprocess python --nms python` and the default `dali` + `graph`),
serves the Python steps exactly as rendered (one instance each, names prefixed py_/dali_/graph_) in the embedded
tritonserver on 127.0.0.1 and sends each step, alone, the tensors it gets inside the ensemble (COCO JPEGs; raw head
outputs / in-graph NMS rows computed here by onnxruntime from the build's FP32 ONNX). Per step it reads the CPU
time (/proc utime + stime) of that model's Python stub and of the tritonserver process (gRPC frontend, scheduling)
over the timed requests: host CPU milliseconds per image.

The DALI step itself runs on the GPU (nvJPEG, resize, pad) and cannot run here: its row is DALI's CPU backend in
this process (`DaliLetterbox`, one thread), the same operators decoding and resizing on the CPU - a stand-in that
costs far more host CPU than the GPU pipeline's host side (which parses headers and feeds nvJPEG). The detector
(TensorRT) is not a host-side step and is left out.

With --map the same images are also scored (pycocotools, in-process, no server): OpenCV letterbox + raw ONNX +
Python NMS (today's ensemble) vs DALI CPU letterbox + in-graph NMS ONNX on onnxruntime, and each change alone, with
paired bootstrap intervals of the differences.

    .venv/bin/python benchmarks/gpu_prepost_bench.py --build /work/baseline/build --map --variants fp32,int8-fp32
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import tritonclient.grpc as grpcclient

from packager.core.paths import assets_dir
from packager.export.nms_graph import NmsSpec, append_nms
from packager.inference import letterbox as lb
from packager.inference import postprocess as pp
from packager.inference.dali_letterbox import DaliLetterbox
from packager.repository.render import gate_name, render_repository
from packager.serve.embedded import LocalTritonServer, find_free_ports
from packager.serve.server_env import ensure_server_env
from packager.verify.report import cpu_name

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
THRESHOLDS = {"production": pp.PRODUCTION_THRESHOLDS, "eval": pp.EVAL_THRESHOLDS}


def cpu_flags() -> str:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile")
    return ", ".join(f for f in wanted if f in flags) or "none of " + ", ".join(wanted)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def descendants(pid: int) -> list[int]:
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def stub_pids(server_pid: int, model: str) -> list[int]:
    pids = []
    for pid in descendants(server_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(f"/{model}/" in arg for arg in argv):
            pids.append(pid)
    return pids


def copy_model(source: Path, destination: Path, name: str) -> None:
    shutil.copytree(source, destination / name)
    config = destination / name / "config.pbtxt"
    text = config.read_text()
    config.write_text(text.replace(f'name: "{source.name}"', f'name: "{name}"', 1))


def timed(server: LocalTritonServer, model: str, make_send, requests: list, concurrency: int,
          warmup: int = 8) -> dict:
    """CPU of the model's stub(s) and of tritonserver per request, `concurrency` clients at once (each its own
    connection): with several requests queued, Triton hands the stub batches of them in one execute()."""
    senders = [make_send() for _ in range(concurrency)]
    for request in requests[:warmup]:
        senders[0](request)
    stubs = stub_pids(server.pid, model)
    if not stubs:
        raise RuntimeError(f"no Python stub of {model} found under tritonserver {server.pid}")
    before = (sum(cpu_seconds(p) for p in stubs), cpu_seconds(server.pid), time.perf_counter())
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda job: senders[job[0] % concurrency](job[1]), enumerate(requests)))
    after = (sum(cpu_seconds(p) for p in stubs), cpu_seconds(server.pid), time.perf_counter())
    n = len(requests)
    return {"stub_ms": 1e3 * (after[0] - before[0]) / n, "server_ms": 1e3 * (after[1] - before[1]) / n,
            "wall_ms": 1e3 * (after[2] - before[2]) / n, "images": n}


def detector_outputs(build: Path, tensors: np.ndarray, tmp: Path) -> tuple[np.ndarray, np.ndarray]:
    source = build / "onnx" / "model.fp32.onnx"
    graph = tmp / "model.fp32.nms.onnx"
    onnx.save(append_nms(onnx.load(str(source))), str(graph))
    raw, rows = [], []
    for path, out in ((source, raw), (graph, rows)):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for start in range(0, len(tensors), 8):
            out.append(session.run(None, {"images": tensors[start : start + 8]})[0])
    return np.concatenate(raw), np.concatenate(rows)


def host_cpu(build: Path, files: list[Path], tmp: Path, concurrency: tuple[int, ...]) -> dict:
    encoded = [f.read_bytes() for f in files]
    prepared = [lb.preprocess_bytes(data) for data in encoded]
    tensors = np.stack([t for t, _ in prepared])
    infos = np.stack([i.as_array() for _, i in prepared])
    raw, rows = detector_outputs(build, tensors, tmp)
    common = {"precisions": ("fp32",), "preprocess_instances": 1, "postprocess_instances": 1}
    python = render_repository(build, tmp / "python", target="gpu", preprocess="python", nms="python", **common)
    dali = render_repository(build, tmp / "dali", target="gpu", **common)
    name = python.model_name
    serving = tmp / "serving"
    serving.mkdir()
    copy_model(python.path / f"{name}_preprocess", serving, "py_preprocess")
    copy_model(python.path / f"{name}_postprocess", serving, "py_postprocess")
    copy_model(dali.path / gate_name(name), serving, "dali_gate")
    copy_model(dali.path / f"{name}_postprocess", serving, "graph_postprocess")
    ports = find_free_ports(3)
    results = {}
    with LocalTritonServer(serving, ensure_server_env(), grpc_port=ports[0], http_port=ports[1],
                           metrics_port=ports[2], log_path=tmp / "tritonserver.log") as server:
        def bytes_request(model):
            def make_send():
                client = grpcclient.InferenceServerClient(server.grpc_url)
                return lambda data: send(client, data)

            def send(client, data):
                tensor = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
                tensor.set_data_from_numpy(np.array([[data]], dtype=np.object_))
                client.infer(model, [tensor])
            return make_send

        def post_request(model, head_name, parameters):
            def make_send():
                client = grpcclient.InferenceServerClient(server.grpc_url)
                return lambda job: send(client, job)

            def send(client, index_and_head):
                index, head = index_and_head
                first = grpcclient.InferInput(head_name, [1, *head.shape[1:]], "FP32")
                first.set_data_from_numpy(head[index : index + 1])
                info = grpcclient.InferInput("letterbox_info", [1, 5], "FP32")
                info.set_data_from_numpy(infos[index : index + 1])
                client.infer(model, [first, info], parameters=parameters)
            return make_send

        for level in concurrency:
            at = f" @ concurrency {level}"
            results["python: preprocess (decode + letterbox)" + at] = timed(
                server, "py_preprocess", bytes_request("py_preprocess"), encoded, level)
            results["dali: gate (checks, no decode)" + at] = timed(
                server, "dali_gate", bytes_request("dali_gate"), encoded, level)
            for label, thresholds in THRESHOLDS.items():
                parameters = {"conf_threshold": thresholds.conf, "iou_threshold": thresholds.iou,
                              "max_det": thresholds.max_det, "multi_label": thresholds.multi_label}
                results[f"python: postprocess (decode + NMS), {label} thresholds" + at] = timed(
                    server, "py_postprocess", post_request("py_postprocess", "output0", parameters),
                    [(i, raw) for i in range(len(files))], level)
                results[f"graph: postprocess (filter + map back), {label} thresholds" + at] = timed(
                    server, "graph_postprocess", post_request("graph_postprocess", NmsSpec().output_name,
                                                              parameters), [(i, rows) for i in range(len(files))],
                    level)
    dali_cpu = DaliLetterbox(640, 640, batch_size=8, num_threads=1)
    dali_cpu(encoded[:8])
    started = time.process_time()
    dali_cpu(encoded)
    results["dali: CPU backend stand-in (decode + letterbox on the CPU, in-process)"] = {
        "stub_ms": 1e3 * (time.process_time() - started) / len(encoded), "server_ms": 0.0, "wall_ms": float("nan"),
        "images": len(encoded)}
    return results


class Scorer:
    """COCO mAP of the sample images through either letterbox and either NMS, in this process."""

    def __init__(self, files: list[Path], annotations: Path, class_names: list[str], tmp: Path):
        from packager.metrics.coco_eval import CocoGroundTruth

        self.files, self.names, self.tmp = files, class_names, tmp
        self.gt = CocoGroundTruth(annotations)
        self.cache = {}
        encoded = [f.read_bytes() for f in files]
        opencv = [lb.preprocess_bytes(data) for data in encoded]
        dali_images, dali_infos = DaliLetterbox(640, 640, batch_size=8)(encoded)
        self.letterboxes = {"opencv": (np.stack([t for t, _ in opencv]), [i for _, i in opencv]),
                            "dali": (dali_images, [lb.LetterboxInfo.from_array(i) for i in dali_infos])}

    def evaluate(self, build: Path, variant: str, letterbox: str, nms: str):
        key = (str(build), variant, letterbox, nms)
        if key not in self.cache:
            self.cache[key] = self._evaluate(build, variant, letterbox, nms)
        return self.cache[key]

    def _evaluate(self, build: Path, variant: str, letterbox: str, nms: str):
        from packager.metrics.coco_eval import evaluate_images

        path = build / "onnx" / f"model.{variant}.onnx"
        if nms == "graph":
            graph = self.tmp / f"{abs(hash(str(build)))}.{variant}.nms.onnx"
            if not graph.is_file():
                onnx.save(append_nms(onnx.load(str(path))), str(graph))
            path = graph
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        tensors, infos = self.letterboxes[letterbox]
        detections = {}
        for start in range(0, len(self.files), 8):
            heads = session.run(None, {"images": tensors[start : start + 8]})[0]
            for offset, head in enumerate(heads):
                info = infos[start + offset]
                if nms == "graph":
                    dets = pp.map_to_original(pp.select_in_graph(head, 1, pp.EVAL_THRESHOLDS), info)
                else:
                    dets = pp.postprocess(head, info, pp.EVAL_THRESHOLDS)
                detections[self.files[start + offset].name] = dets
        return evaluate_images(detections, self.gt, self.names)


def _difference(candidate, reference) -> dict:
    from packager.metrics.intervals import paired_difference

    diff = paired_difference(candidate.per_image, reference.per_image)
    return {"map50_95": candidate.metrics.map50_95, "diff": diff.difference, "low": diff.low, "high": diff.high}


PATHS = (("opencv", "python"), ("opencv", "graph"), ("dali", "python"), ("dali", "graph"))


def score(build: Path, scorer: Scorer, variants: list[str], calibration_build: Path | None,
          quick: bool = False) -> dict:
    out = {}
    for variant in variants:
        paths = (PATHS[0], PATHS[3]) if quick else PATHS
        evaluations = {(letterbox, nms): scorer.evaluate(build, variant, letterbox, nms) for letterbox, nms in paths}
        reference = evaluations[("opencv", "python")]
        out[variant] = {f"{letterbox} letterbox + {nms} NMS": _difference(evaluation, reference)
                        for (letterbox, nms), evaluation in evaluations.items()}
        print(json.dumps({variant: out[variant]}, indent=1), flush=True)
    if calibration_build is not None:
        # The same recipe calibrated on DALI-letterboxed images vs on OpenCV's (the build's): served both ways.
        out["calibrated through DALI (int8-fp32)"] = {
            f"{letterbox} letterbox + {nms} NMS": _difference(
                scorer.evaluate(calibration_build, "int8-fp32", letterbox, nms),
                scorer.evaluate(build, "int8-fp32", letterbox, nms))
            for letterbox, nms in (("opencv", "python"), ("dali", "graph"))}
        print(json.dumps(out["calibrated through DALI (int8-fp32)"], indent=1), flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    assets = assets_dir()
    parser.add_argument("--build", type=Path, required=True)
    parser.add_argument("--images", type=Path, default=assets / "coco" / "val2017")
    parser.add_argument("--annotations", type=Path, default=assets / "coco" / "annotations" / "instances_val2017_128.json")
    parser.add_argument("--count", type=int, default=128)
    parser.add_argument("--map", action="store_true", help="also score both paths (pycocotools)")
    parser.add_argument("--variants", default="fp32,int8-fp32")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--concurrency", default="1,16", help="client requests in flight per step")
    parser.add_argument("--no-host", action="store_true", help="skip the host CPU part (with --map)")
    parser.add_argument("--quick", action="store_true",
                        help="with --map: only today's path and DALI + in-graph NMS, not each change alone")
    parser.add_argument("--calibration-build", type=Path, default=None,
                        help="with --map: a build of the same recipe calibrated on DALI-letterboxed images "
                             "(yqpack build --calib-data), scored against --build's INT8")
    args = parser.parse_args()
    files = sorted(args.images.glob("*.jpg"))[: args.count]
    report = {"cpu": cpu_name(), "instruction_sets": cpu_flags(), "cores": len(os.sched_getaffinity(0))}
    with tempfile.TemporaryDirectory(prefix="gpu-prepost-bench-") as tmp:
        levels = tuple(int(c) for c in args.concurrency.split(","))
        report["host_cpu_ms_per_image"] = {} if args.no_host else host_cpu(args.build, files, Path(tmp), levels)
        print(f"# host CPU per served image, {len(files)} COCO images, {report['cpu']} ({report['instruction_sets']}),"
              f" {report['cores']} cores")
        print("| step | stub CPU ms | tritonserver CPU ms | wall ms |\n|---|---|---|---|")
        for step, row in report["host_cpu_ms_per_image"].items():
            print(f"| {step} | {row['stub_ms']:.3f} | {row['server_ms']:.3f} | {row['wall_ms']:.2f} |")
        if args.map:
            names = json.loads((args.build / "manifest.json").read_text())["class_names"]
            scorer = Scorer(files, args.annotations, names, Path(tmp))
            report["map"] = score(args.build, scorer, args.variants.split(","), args.calibration_build,
                                args.quick)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
