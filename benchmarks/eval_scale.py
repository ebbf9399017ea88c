"""How memory and time of COCO scoring and the paired bootstrap grow with the number of images.

The labelled images of the assets (the 128 official val2017 + the 640 val2017-dev) are tiled to N images: copy c of
an image keeps its boxes, and gets that image's real detections (of --variants, run once from --build and cached
in --detections) with every box and score jittered by a seeded noise (copy 0 unjittered), so each copy is a new
image to pycocotools. Without --build or --detections, detections are synthesized from the boxes (a reference and a
noisier candidate). Each size runs in its own process: the peak RSS of every step is that step's own (Linux resets
the high-water mark through /proc/self/clear_refs), and a process above --memory-limit-gb is stopped and reported.

Steps: load the ground truth; per variant, pycocotools' evaluation (evaluate_images: results -> COCOeval evaluate,
accumulate, summarize -> per-image results) with that variant's detections freed afterwards; then paired_ratio of
the last variant against the first over --resamples resamples ("bootstrap", including its one-off precomputation).

    python benchmarks/eval_scale.py --build /work/baseline/build --detections dets.pkl --sizes 128,640,2000,5000
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from packager.core.paths import assets_dir

SOURCES = (("val2017", "instances_val2017_128.json"), ("val2017-dev", "instances_val2017_dev640.json"))
COPY_ID_STRIDE = 10**7  # image id of copy c = c * stride + the original id (keeps annotation order per copy)


def source_annotations(assets: Path) -> tuple[dict, list[tuple[str, dict]]]:
    """Merged annotation set of the source images and, per image, (split, image record) in annotation order."""
    merged = {"images": [], "annotations": [], "categories": None}
    order = []
    for split, name in SOURCES:
        data = json.loads((assets / "coco" / "annotations" / name).read_text())
        merged["categories"] = merged["categories"] or data["categories"]
        merged["images"] += data["images"]
        merged["annotations"] += data["annotations"]
        order += [(split, image) for image in data["images"]]
    return merged, order


def real_detections(build: Path, cache: Path | None, variants: list[str]) -> dict:
    """{(split, variant): {file name: (n, 6)}} of the build's ONNX variants on the source images (cached)."""
    from packager.core.contracts import BuildManifest
    from packager.evaluate.onnx_eval import detect_with, open_variant
    from packager.metrics.coco_eval import CocoGroundTruth

    cached = pickle.loads(cache.read_bytes()) if cache and cache.is_file() else {}
    manifest = BuildManifest.load(build)
    assets = assets_dir()
    for split, name in SOURCES:
        files = CocoGroundTruth(assets / "coco" / "annotations" / name).image_files(assets / "coco" / split)
        for variant in variants:
            if (split, variant) not in cached:
                cached[(split, variant)] = detect_with(open_variant(build, manifest, variant), files,
                                                       manifest.model.imgsz, label=f"{split} {variant}",
                                                       head_format=manifest.model.head)
                if cache:
                    cache.write_bytes(pickle.dumps(cached))
    return cached


def synthetic_detections(annotations: dict, order: list[tuple[str, dict]], variants: list[str],
                         class_ids: dict[int, int]) -> dict:
    """Detections made from the boxes: each variant finds a box with some probability (noisier for later
    variants), with box noise, plus low-scored false positives; scores are unique within an image."""
    by_image: dict[int, list[dict]] = {}
    for ann in annotations["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    out = {}
    for v, variant in enumerate(variants):
        rng = np.random.default_rng(100 + v)
        for split, _ in SOURCES:
            out[(split, variant)] = {}
        for split, image in order:
            anns = [a for a in by_image.get(image["id"], []) if not a.get("iscrowd", 0)]
            boxes = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
            found = rng.random(len(anns)) > 0.2 + 0.05 * v
            noise = (rng.random((len(anns), 4)) - 0.5) * (0.1 + 0.05 * v)
            xyxy = np.column_stack([boxes[:, 0], boxes[:, 1], boxes[:, 0] + boxes[:, 2], boxes[:, 1] + boxes[:, 3]])
            xyxy += noise * np.repeat(boxes[:, 2:], 2, axis=0).reshape(-1, 4)
            classes = np.array([class_ids[a["category_id"]] for a in anns], dtype=np.float64)
            false = 150
            fp_xy = rng.random((false, 2)) * [image["width"], image["height"]]
            fp_wh = rng.random((false, 2)) * 0.3 * [image["width"], image["height"]]
            fp = np.column_stack([fp_xy, fp_xy + fp_wh])
            rows = np.vstack([np.column_stack([xyxy[found], classes[found]]),
                              np.column_stack([fp, rng.integers(0, len(class_ids), false)])])
            scores = np.concatenate([0.3 + 0.7 * rng.random(int(found.sum())), 0.001 + 0.4 * rng.random(false)])
            scores += np.arange(scores.size) * 1e-5  # no ties within an image
            out[(split, variant)][image["file_name"]] = np.column_stack(
                [rows[:, :4], scores, rows[:, 4]]).astype(np.float32)
    return out


def tile(images: int, annotations: dict, order: list[tuple[str, dict]], detections: dict,
         variants: list[str]) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """(annotation set of `images` tiled images, {variant: {file name: jittered detections}})."""
    by_image: dict[int, list[dict]] = {}
    for ann in annotations["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    tiled = {"images": [], "annotations": [], "categories": annotations["categories"]}
    dets = {variant: {} for variant in variants}
    for n in range(images):
        copy, (split, image) = divmod(n, len(order))[0], order[n % len(order)]
        name = f"{copy:03d}_{image['file_name']}"
        image_id = copy * COPY_ID_STRIDE + image["id"]
        tiled["images"].append({**image, "id": image_id, "file_name": name})
        for ann in by_image.get(image["id"], []):
            tiled["annotations"].append({**ann, "id": len(tiled["annotations"]) + 1, "image_id": image_id})
        for v, variant in enumerate(variants):
            rows = np.array(detections[(split, variant)][image["file_name"]], dtype=np.float32).reshape(-1, 6)
            if copy:
                rng = np.random.default_rng((copy, n % len(order), v))
                size = np.repeat(rows[:, 2:4] - rows[:, 0:2], 2, axis=0).reshape(-1, 4)
                rows = rows.copy()
                rows[:, :4] += ((rng.random((len(rows), 4)) - 0.5) * 0.04 * size).astype(np.float32)
                rows[:, 4] = np.clip(rows[:, 4] * np.exp(0.1 * (rng.random(len(rows)) - 0.5)), 0.001, 1.0)
            dets[variant][name] = rows
    return tiled, dets


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Steps:
    """Wall and CPU time (this process, all threads: the honest figure on a shared machine), RSS after, and peak RSS during each step of this process (every step of it: the process peak is
    their maximum, since resetting the high-water mark also resets getrusage's)."""

    def __init__(self, log: Path | None = None):
        self.rows = []
        self.log = log  # each finished step is appended there too: the parent keeps them if it stops this process

    def run(self, name: str, function, *args, note: dict | None = None, **kwargs):
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
        started, cpu = time.perf_counter(), time.process_time()
        value = function(*args, **kwargs)
        self.rows.append({"step": name, "seconds": round(time.perf_counter() - started, 2),
                          "cpu_seconds": round(time.process_time() - cpu, 2),
                          "peak_rss_mb": round(_rss_mb("VmHWM")), "rss_after_mb": round(_rss_mb("VmRSS")), **(note or {})})
        print(json.dumps(self.rows[-1]), file=sys.stderr, flush=True)
        if self.log:
            with self.log.open("a") as log:
                log.write(json.dumps(self.rows[-1]) + "\n")
        return value


def child(images: int, source: Path, variants: list[str], resamples: int) -> dict:
    from packager.metrics.coco_eval import CocoGroundTruth, evaluate_images
    from packager.metrics.intervals import paired_ratio

    steps = Steps(source.with_name(f"steps_{images}.jsonl"))
    annotations, order, detections, class_names = steps.run("load sources", lambda: pickle.loads(source.read_bytes()))
    tiled, dets = steps.run("tile", tile, images, annotations, order, detections, variants)
    del detections
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "annotations.json"
        path.write_text(json.dumps(tiled))
        del tiled
        ground_truth = steps.run("ground truth", CocoGroundTruth, path)
    per_image, counts = {}, {}
    for variant in variants:
        counts[variant] = int(sum(len(d) for d in dets[variant].values()))
        evaluation = steps.run(f"evaluate {variant}", evaluate_images, dets.pop(variant), ground_truth, class_names,
                               note={"detections": counts[variant]})
        per_image[variant] = evaluation.per_image
    interval = steps.run("bootstrap", paired_ratio, per_image[variants[-1]], per_image[variants[0]],
                         variants[-1], variants[0], resamples=resamples)
    return {"images": images, "detections": counts, "resamples": resamples, "interval": interval.text(),
            "steps": steps.rows, "peak_rss_mb": max(step["peak_rss_mb"] for step in steps.rows)}


def run_size(images: int, source: Path, args) -> dict:
    """One size in a fresh process, stopped above the memory limit (RSS polled every 0.2 s)."""
    import psutil

    command = [sys.executable, __file__, "--child", str(images), "--source", str(source), "--variants",
               args.variants, "--resamples", str(args.resamples)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    watched, peak = psutil.Process(process.pid), 0
    while process.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        if peak > args.memory_limit_gb * 2**30:
            process.kill()
            process.wait()
            log = source.with_name(f"steps_{images}.jsonl")
            done = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
            return {"images": images, "steps": done, "stopped": f"RSS above {args.memory_limit_gb:g} GB"}
        time.sleep(0.2)
    out = process.stdout.read()
    if process.returncode != 0:
        return {"images": images, "stopped": f"exit {process.returncode}"}
    return json.loads(out.strip().splitlines()[-1])


def cpu_name() -> str:
    info = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    sets = [name for name in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if name in flags]
    return f"{model}, {os.cpu_count()} vCPU, {' '.join(sets) or 'no AVX2'}"


def _cell(step: dict) -> str:
    return f"{step['seconds']:.1f} s ({step['cpu_seconds']:.1f} s CPU), {step['peak_rss_mb']:,} MB"


def table(rows: list[dict], variants: list[str]) -> str:
    lines = ["| images | detections per variant | pycocotools per variant: wall (CPU), peak RSS "
             "| bootstrap: wall (CPU), peak RSS | process peak RSS |", "|---|---|---|---|---|"]
    for row in rows:
        steps = {step["step"]: step for step in row.get("steps", [])}
        evaluations = ", ".join(_cell(steps[f"evaluate {v}"]) if f"evaluate {v}" in steps else "-" for v in variants)
        counts = ", ".join(f"{steps[f'evaluate {v}']['detections']:,}" if f"evaluate {v}" in steps else "-"
                           for v in variants)
        if "stopped" in row:
            next_step = "bootstrap" if all(f"evaluate {v}" in steps for v in variants) else "evaluation"
            lines.append(f"| {row['images']:,} | {counts} | {evaluations} | stopped in the {next_step}: "
                         f"{row['stopped']} | > {row['stopped'].split()[-2]} GB |")
            continue
        lines.append(f"| {row['images']:,} | {counts} | {evaluations} | {_cell(steps['bootstrap'])} "
                     f"| {row['peak_rss_mb']:,} MB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", type=Path, help="build whose ONNX variants detect on the source images once")
    parser.add_argument("--detections", type=Path, help="cache of those detections (read, or written with --build)")
    parser.add_argument("--variants", default="fp32,int8-fp32", help="reference first; the bootstrap pairs the last")
    parser.add_argument("--sizes", default="128,640,2000,5000")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--memory-limit-gb", type=float, default=8.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    if args.child:
        print(json.dumps(child(args.child, args.source, variants, args.resamples)))
        return
    annotations, order = source_annotations(assets_dir())
    categories = sorted(annotations["categories"], key=lambda c: c["id"])
    class_names = [c["name"] for c in categories]  # YOLO class order = COCO categories by id
    if args.build or (args.detections and args.detections.is_file()):
        detections = real_detections(args.build, args.detections, variants) if args.build else \
            pickle.loads(args.detections.read_bytes())
        kind = "real detections, jittered per copy"
    else:
        detections = synthetic_detections(annotations, order, variants, {c["id"]: i for i, c in enumerate(categories)})
        kind = "synthetic detections from the boxes"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "source.pkl"
        source.write_bytes(pickle.dumps((annotations, order, detections, class_names)))
        for images in [int(n) for n in args.sizes.split(",")]:
            rows.append(run_size(images, source, args))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{cpu_name()}; {kind}; {args.resamples} resamples\n")
    print(table(rows, variants))
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "detections": kind, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
