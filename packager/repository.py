"""Render the Triton model repository (preprocess + detector + postprocess + ensemble) from `templates/`.

Layout and tensor names follow docs/architecture.md ("Model repository contract"). Rendering is atomic: the
repository is built in a temporary sibling folder and swapped in, so a failure leaves the previous one intact.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from packager import letterbox as letterbox_module
from packager import image_header as image_header_module
from packager import postprocess as postprocess_module
from packager import request_params as request_params_module
from packager.assets import TEMPLATES_DIR
from packager.postprocess import PRODUCTION_THRESHOLDS, Thresholds

TARGETS = ("local", "cpu", "gpu", "gpu-ort")
PRECISIONS = ("fp32", "fp16", "int8")
# Which build artifact each target serves per precision (onnxruntime CPU mis-rounds FP16 Q/DQ inputs).
ONNX_VARIANT = {
    "local": {"fp32": "fp32", "fp16": "fp16", "int8": "int8-fp32"},
    "cpu": {"fp32": "fp32", "fp16": "fp16", "int8": "int8-fp32"},
    # gpu-ort: TensorRT picks FP16 layers itself (precision_mode FP16) from the FP32 graph, see docs/architecture.md.
    "gpu-ort": {"fp32": "fp32", "fp16": "fp32", "int8": "int8"},
    "gpu": {"fp32": "fp32", "fp16": "fp16", "int8": "int8"},
}
# Python pre/post instances per target: on a CPU target the detector needs the cores (one of each keeps up
# with it); a GPU detector is fast enough that decoding JPEGs on several host cores becomes the bottleneck.
PRE_POST_INSTANCES = {"local": (1, 1), "cpu": (1, 1), "gpu": (4, 2), "gpu-ort": (4, 2)}
# How long the detector's batcher waits for more requests. A CPU detector runs ~100 ms per batch, so requests
# pile up behind it anyway and a wait only adds latency (2 ms per request at concurrency 1, measured); a GPU
# detector is done in a few ms, and a short wait is what lets batches form at all.
MAX_QUEUE_DELAY_US = {"local": 0, "cpu": 0, "gpu": 2000, "gpu-ort": 2000}
REPOSITORY_INFO = "yqpack_repository.json"
# Model names become folder names and pbtxt strings: nothing that could leave the repository or quote out.
MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")
LABELS_FILE = "labels.txt"


@dataclass(frozen=True)
class RepositoryResult:
    path: Path
    target: str
    model_name: str
    ensembles: dict[str, str]  # precision -> ensemble model name
    models: list[str] = field(default_factory=list)  # every Triton model rendered


def ensemble_name(model_name: str, precision: str) -> str:
    return f"{model_name}_{precision}"


def detector_name(model_name: str, precision: str) -> str:
    return f"{model_name}_{precision}_detector"


def render_repository(
    build_dir: Path,
    repository_dir: Path,
    target: str = "local",
    precisions: tuple[str, ...] | list[str] = ("fp16", "int8"),
    max_batch: int | None = None,
    *,
    preferred_batch_sizes: list[int] | None = None,
    max_queue_delay_us: int | None = None,
    detector_instances: int = 1,
    preprocess_instances: int | None = None,
    postprocess_instances: int | None = None,
    intra_op_threads: int = 0,
    thresholds: Thresholds = PRODUCTION_THRESHOLDS,
    engines: dict[str, Path] | None = None,
    max_pixels: int = letterbox_module.DEFAULT_MAX_PIXELS,
    reject_corrupt: bool = True,
) -> RepositoryResult:
    """Render a repository for `target` serving each precision of the build in `build_dir`.

    `max_batch` defaults to the manifest's `max_batch` (8 if absent). `engines` maps precision -> TensorRT
    plan for the `gpu` target; without one the config is rendered and `model.plan` is expected later.
    `intra_op_threads` 0 lets onnxruntime pick. Pre/post instance counts and the detector's batching delay default
    per target (PRE_POST_INSTANCES, MAX_QUEUE_DELAY_US). `max_pixels` (the served pixel budget) and
    `reject_corrupt` (refuse corrupt JPEG data) become the preprocess config parameters of the same names.
    """
    build_dir, repository_dir = Path(build_dir), Path(repository_dir)
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}: choose one of {', '.join(TARGETS)}")
    if not precisions:
        raise ValueError("no precision to serve: pass at least one of fp32, fp16, int8")
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise ValueError(f"unknown precision(s) {', '.join(unknown)}: choose from {', '.join(PRECISIONS)}")
    detector_templates = TEMPLATES_DIR / "detector" / target
    if not (detector_templates / "config.pbtxt.j2").is_file():
        raise FileNotFoundError(f"no detector template for target {target!r} at {detector_templates}")
    manifest = _load_manifest(build_dir)
    max_batch = int(max_batch or manifest.get("max_batch") or 8)
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    preferred = sorted(set(preferred_batch_sizes or [b for b in (2, 4, 8) if b <= max_batch] or [max_batch]))
    if preferred[-1] > max_batch or preferred[0] < 1:
        raise ValueError(f"preferred batch sizes {preferred} must lie within 1..max_batch={max_batch}")
    sources = {p: _detector_source(build_dir, manifest, target, p) for p in precisions}
    plans = {p: Path(plan) for p, plan in (engines or {}).items() if p in precisions} if target == "gpu" else {}
    for precision, plan in plans.items():
        if not plan.is_file():
            raise FileNotFoundError(f"TensorRT engine for {precision} not found: {plan}")
    preprocess_instances = preprocess_instances or PRE_POST_INSTANCES[target][0]
    postprocess_instances = postprocess_instances or PRE_POST_INSTANCES[target][1]
    if max_queue_delay_us is None:
        max_queue_delay_us = MAX_QUEUE_DELAY_US[target]

    name = manifest["model_name"]
    if not isinstance(name, str) or not MODEL_NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"manifest model_name {name!r} must use only letters, digits, '_', '.' and '-'")
    if int(max_pixels) < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    input_dims = [int(d) for d in manifest["input"]["shape"][1:]]
    output_dims = [int(d) for d in manifest["output"]["shape"][1:]]
    if len(input_dims) != 3 or min(input_dims + output_dims) < 1:
        raise ValueError(f"manifest input/output shapes must be fixed except the batch: {input_dims}, {output_dims}")
    common = {
        "max_batch_size": max_batch,
        "input_name": manifest["input"]["name"],
        "input_dims": input_dims,
        "output_name": manifest["output"]["name"],
        "output_dims": output_dims,
    }
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)), undefined=jinja2.StrictUndefined, keep_trailing_newline=True
    )
    repository_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{repository_dir.name}.rendering-", dir=repository_dir.parent))
    try:
        models = []
        labels = "\n".join(manifest["class_names"]) + "\n"
        # A JSON list inside a single-quoted protobuf text string: escape what that string cannot hold.
        class_names_pbtxt = json.dumps(manifest["class_names"]).replace("\\", "\\\\").replace("'", "\\'")
        pre, post = f"{name}_preprocess", f"{name}_postprocess"
        _python_model(
            env, staging / pre, "preprocess", [letterbox_module.__file__, image_header_module.__file__,
                                               request_params_module.__file__],
            {**common, "name": pre, "instance_count": preprocess_instances, "max_pixels": int(max_pixels),
             "reject_corrupt": bool(reject_corrupt)},
        )
        _python_model(
            env, staging / post, "postprocess",
            [letterbox_module.__file__, image_header_module.__file__, postprocess_module.__file__,
             request_params_module.__file__],
            {**common, "name": post, "instance_count": postprocess_instances, "thresholds": thresholds},
        )
        (staging / post / LABELS_FILE).write_text(labels)
        models += [pre, post]
        ensembles = {}
        for precision in precisions:
            detector = detector_name(name, precision)
            model_filename = "model.plan" if target == "gpu" else "model.onnx"
            context = {
                **common,
                "name": detector,
                "precision": precision,
                "preferred_batch_sizes": preferred,
                "max_queue_delay_us": int(max_queue_delay_us),
                "instance_count": detector_instances,
                "model_filename": model_filename,
                "intra_op_threads": int(intra_op_threads),
            }
            version_dir = staging / detector / "1"
            version_dir.mkdir(parents=True)
            _render(env, f"detector/{target}/config.pbtxt.j2", context, staging / detector / "config.pbtxt")
            for extra in sorted(detector_templates.iterdir()):
                if extra.is_file() and extra.suffix == ".py":  # the local target's Python-backend model
                    shutil.copy2(extra, version_dir / extra.name)
            # gpu: model.onnx is the engine source; the engines step (or `engines`) writes model.plan beside it.
            shutil.copy2(sources[precision], version_dir / "model.onnx")
            if precision in plans:
                shutil.copy2(plans[precision], version_dir / "model.plan")
            ensemble = ensemble_name(name, precision)
            (staging / ensemble / "1").mkdir(parents=True)  # Triton wants a version folder, even empty
            _render(
                env,
                "ensemble/config.pbtxt.j2",
                {**common, "name": ensemble, "precision": precision, "preprocess_name": pre,
                 "detector_name": detector, "postprocess_name": post, "class_names_pbtxt": class_names_pbtxt},
                staging / ensemble / "config.pbtxt",
            )
            (staging / ensemble / LABELS_FILE).write_text(labels)
            ensembles[precision] = ensemble
            models += [detector, ensemble]
        info = {
            "model_name": name,
            "target": target,
            "ensembles": ensembles,
            "models": models,
            "class_names": manifest["class_names"],
            "imgsz": input_dims[1:],
            "max_batch_size": max_batch,
            "default_thresholds": thresholds._asdict(),
            "detector_sources": {p: str(s) for p, s in sources.items()},
        }
        (staging / REPOSITORY_INFO).write_text(json.dumps(info, indent=2) + "\n")
        _swap_in(staging, repository_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return RepositoryResult(path=repository_dir, target=target, model_name=name, ensembles=ensembles, models=models)


def load_repository_info(repository_dir: Path) -> dict:
    """The summary written at render time (model name, target, ensembles per precision, class names)."""
    path = Path(repository_dir) / REPOSITORY_INFO
    if not path.is_file():
        raise FileNotFoundError(
            f"{repository_dir} is not a yqpack model repository (no {REPOSITORY_INFO}); run yqpack build"
        )
    return json.loads(path.read_text())


def _load_manifest(build_dir: Path) -> dict:
    path = build_dir / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"no manifest.json in {build_dir}: run `yqpack build` first")
    manifest = json.loads(path.read_text())
    missing = [k for k in ("model_name", "class_names", "input", "output", "artifacts") if k not in manifest]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: was it written by yqpack build?")
    return manifest


def _detector_source(build_dir: Path, manifest: dict, target: str, precision: str) -> Path:
    """The ONNX a detector serves, or for `gpu` the ONNX its TensorRT engine is built from on the serving host."""
    variant = ONNX_VARIANT[target][precision]
    artifact = manifest["artifacts"].get(variant)
    if artifact is None:
        raise ValueError(f"the build in {build_dir} has no {variant!r} model, needed to serve {precision} on {target}")
    path = build_dir / artifact["path"]
    if not path.is_file():
        raise FileNotFoundError(f"{variant} model missing: {path}")
    return path


def _python_model(env: jinja2.Environment, model_dir: Path, template: str, modules: list[str], context: dict) -> None:
    """A Python-backend model: rendered config, model.py, and yqpack's own modules copied flat beside it."""
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True)
    _render(env, f"{template}/config.pbtxt.j2", context, model_dir / "config.pbtxt")
    shutil.copy2(TEMPLATES_DIR / template / "model.py", version_dir / "model.py")
    for module in modules:
        shutil.copy2(module, version_dir / Path(module).name)


def _render(env: jinja2.Environment, template: str, context: dict, destination: Path) -> None:
    destination.write_text(env.get_template(template).render(**context))


def _swap_in(staging: Path, repository_dir: Path) -> None:
    """Replace repository_dir by staging with renames only, so readers never see a half-written repository."""
    if not repository_dir.exists():
        staging.rename(repository_dir)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{repository_dir.name}.previous-", dir=repository_dir.parent))
    retired.rmdir()
    repository_dir.rename(retired)
    try:
        staging.rename(repository_dir)
    except OSError:
        retired.rename(repository_dir)
        raise
    shutil.rmtree(retired, ignore_errors=True)
