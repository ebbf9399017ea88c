"""`yqpack verify --images` on thousands of images: peak memory and time of the verify process as the accuracy pass
grows (served detections of every image, pycocotools per ensemble, the paired bootstrap of each comparison).

Renders the `local` repository of --build (--precisions), starts the embedded tritonserver once, and for each size N
makes a folder of N images (symlinks to the assets' 768 labelled images, tiled as benchmarks/eval_scale.py tiles
them: copy c is named <c>_<file>) with its annotation file, then runs `run_verify` on it in a fresh process: one
short load level (the accuracy pass is what grows with N), the bare-detector levels off, and with --references the
build's own ONNX evaluated on the same images for --max-map-drift. Reports the verify process's peak RSS (the
server's memory is the server's), its wall and CPU time, and the interval each precision comparison rests on.

    python benchmarks/verify_scale.py --build /work/baseline/build --precisions fp32,fp16 --sizes 256,2000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from eval_scale import COPY_ID_STRIDE, cpu_name, source_annotations

from packager.core.paths import assets_dir


def tiled_folder(images: int, folder: Path) -> Path:
    """`images` tiled images as symlinks in `folder` and their annotation file (returned)."""
    annotations, order = source_annotations(assets_dir())
    by_image: dict[int, list[dict]] = {}
    for ann in annotations["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    tiled = {"images": [], "annotations": [], "categories": annotations["categories"]}
    folder.mkdir(parents=True)
    for n in range(images):
        copy, (split, image) = n // len(order), order[n % len(order)]
        name = f"{copy:03d}_{image['file_name']}"
        (folder / name).symlink_to(assets_dir() / "coco" / split / image["file_name"])
        image_id = copy * COPY_ID_STRIDE + image["id"]
        tiled["images"].append({**image, "id": image_id, "file_name": name})
        tiled["annotations"] += [{**ann, "id": len(tiled["annotations"]) + i + 1, "image_id": image_id}
                                 for i, ann in enumerate(by_image.get(image["id"], []))]
    path = folder.parent / f"annotations_{images}.json"
    path.write_text(json.dumps(tiled))
    return path


def child(args) -> dict:
    from packager.verify.gates import AbsoluteGates
    from packager.verify.run import VerifyOptions, run_verify

    started, cpu = time.perf_counter(), time.process_time()
    result = run_verify(VerifyOptions(
        images_dir=args.images_dir, annotations=args.annotations, url=args.url,
        build_dir=args.build if args.references else None, report_dir=args.report_dir, concurrency=(1,),
        requests_per_level=8, warmup_requests=0, detector_load=False, progress=False,
        absolute=AbsoluteGates() if args.references else AbsoluteGates(min_map=0.0)))
    return {"images": result.images["accuracy"], "status": result.status,
            "wall_s": round(time.perf_counter() - started, 1), "cpu_s": round(time.process_time() - cpu, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "detections": {a.model: a.metrics.detections if a.metrics else 0 for a in result.accuracy},
            "intervals": {c.model: c.interval.text() if c.interval else None for c in result.comparisons}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", type=Path, required=True)
    parser.add_argument("--precisions", default="fp32,fp16")
    parser.add_argument("--sizes", default="256,2000")
    parser.add_argument("--references", action="store_true", help="also evaluate the build's ONNX on the images")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    for hidden in ("--images-dir", "--annotations", "--report-dir"):
        parser.add_argument(hidden, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    from packager.repository.render import render_repository
    from packager.serve.embedded import LocalTritonServer, find_free_ports
    from packager.serve.server_env import ensure_server_env

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        repository = render_repository(args.build, Path(tmp) / "model_repository", target="local",
                                       precisions=tuple(args.precisions.split(",")))
        grpc_port, http_port, metrics_port = find_free_ports(3)
        with LocalTritonServer(repository.path, ensure_server_env(), grpc_port=grpc_port, http_port=http_port,
                               metrics_port=metrics_port, log_path=Path(tmp) / "server.log") as server:
            for images in [int(n) for n in args.sizes.split(",")]:
                folder = Path(tmp) / f"images_{images}"
                annotations = tiled_folder(images, folder)
                command = [sys.executable, __file__, "--build", str(args.build), "--child",
                           "--images-dir", str(folder), "--annotations", str(annotations), "--url", server.grpc_url,
                           "--report-dir", str(Path(tmp) / f"report_{images}")] + \
                          (["--references"] if args.references else [])
                run = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
                rows.append(json.loads(run.stdout.strip().splitlines()[-1]) if run.returncode == 0 else
                            {"images": images, "failed": run.stderr[-2000:]})
                print(json.dumps(rows[-1]), flush=True)
    print(f"\n{cpu_name()}; precisions {args.precisions}; references {'on' if args.references else 'off'}\n")
    print("| images | detections per ensemble | verify wall (CPU) | verify peak RSS | interval |\n|---|---|---|---|---|")
    for row in rows:
        if "failed" in row:
            print(f"| {row['images']:,} | failed | | | |")
            continue
        detections = ", ".join(f"{count:,}" for count in row["detections"].values())
        intervals = "; ".join(f"{model} {text}" for model, text in row["intervals"].items())
        print(f"| {row['images']:,} | {detections} | {row['wall_s']:.0f} s ({row['cpu_s']:.0f} s) "
              f"| {row['peak_rss_mb']:,} MB | {intervals} |")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
