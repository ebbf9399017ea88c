"""The mAP a served ensemble must reproduce: the build's own `eval-onnx` of the ONNX it serves.

Served pre/post are the package's own code and the detector runs the same ONNX, so served mAP equals the
local evaluation to 4 decimals on CPU (a GPU engine drifts a little: `--max-map-drift`). The reference comes
from the build manifest's `evaluation` when it covered as many images as verify scores (independent of the
annotation file verify was given: mirrored annotations cannot pass), else it is computed here on exactly the
images verify scored.
"""

from __future__ import annotations

from pathlib import Path

from packager.metrics import coco_eval
from packager.core.contracts import BuildManifest, StateFileError, YqpackError
from packager.verify.gates import AccuracyReference
from packager.core.repository_index import RepositoryIndex

# The ONNX each served precision is evaluated from (as `eval-onnx`; the fp32 INT8 twin has the served scales).
REFERENCE_VARIANT = {"fp32": "fp32", "fp16": "fp16", "int8": "int8-fp32"}


def find_build_dir(build_dir: Path | None, url: str) -> Path | None:
    """--build, else the build behind the repository a detached `yqpack serve` serves at `url`."""
    if build_dir is not None:
        return Path(build_dir)
    from packager.serve.records import read_state

    try:
        state = read_state()
        if state is None or state.grpc_url != url.replace("localhost", "127.0.0.1"):
            return None
        source = RepositoryIndex.load(Path(state.repository)).source_build
    except (OSError, ValueError, TypeError, StateFileError, YqpackError):  # no usable record: no reference from it
        return None
    return Path(source) if source and (Path(source) / "manifest.json").is_file() else None


def accuracy_reference(
    model: str,
    precision: str,
    build_dir: Path,
    files: list[Path],
    ground_truth: coco_eval.CocoGroundTruth,
    class_names: list[str],
    show_progress: bool = False,
) -> AccuracyReference | None:
    """Reference mAP50-95 of `model` (one served precision) for the images `files`; None if the build lacks it."""
    variant = REFERENCE_VARIANT.get(precision)
    if variant is None:
        return None
    manifest = BuildManifest.load(build_dir)
    recorded = (manifest.evaluation or {}).get(variant)
    if isinstance(recorded, dict) and recorded.get("images") == len(files) and "map50_95" in recorded:
        return AccuracyReference(model, variant, float(recorded["map50_95"]), len(files),
                                 f"the build manifest's evaluation of {variant} ({len(files)} images)")
    if variant not in manifest.artifacts:
        return None
    onnx = manifest.artifact_path(build_dir, variant)
    metrics = _evaluate_onnx(onnx, manifest, files, ground_truth, class_names, show_progress)
    return AccuracyReference(model, variant, metrics.map50_95, len(files),
                             f"eval-onnx of {onnx.name} on the same {len(files)} images", str(ground_truth.path))


def _evaluate_onnx(onnx: Path, manifest: BuildManifest, files, ground_truth, class_names,
                   show_progress) -> coco_eval.CocoMetrics:
    from packager.evaluate.onnx_eval import detect_images

    # The default runtime, as the `local` target serves (another runtime's drift stays within --max-map-drift).
    detections = detect_images(onnx, files, manifest.model.imgsz, label=f"reference {onnx.name}",
                               show_progress=show_progress, head_format=manifest.model.head)
    return coco_eval.evaluate(detections, ground_truth, class_names)
