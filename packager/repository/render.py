"""Render the Triton model repository (preprocess + detector + postprocess + ensemble) from `templates/`.

Layout and tensor names follow docs/architecture.md ("Model repository contract"). Rendering is atomic: the
repository is built in a temporary sibling folder and swapped in, so a failure leaves the previous one intact.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from packager.inference import letterbox as letterbox_module
from packager.inference import image_header as image_header_module
from packager.inference import postprocess as postprocess_module
from packager.inference import runtime as runtime_module
from packager.inference import int8_cpu as int8_cpu_module
from packager.inference import request_params as request_params_module
from packager.core.paths import TEMPLATES_DIR
from packager.core.contracts import (
    ConfigError,
    MissingInputError,
    ModelSpec,
    HeadFormat,
    Precision,
    Role,
    TensorSpec,
    check_model_name,
)
from packager.core.manifest import BuildManifest
from packager.inference.postprocess import PRODUCTION_THRESHOLDS, Thresholds
from packager.core.repository_index import RepositoryIndex, ServedModel
from packager.core.files import replace_directory
from packager.engines.images import image_facts
from packager.export.nms_graph import NmsSpec, write_nms_graph
from packager.repository.targets import (
    DETECTIONS_TENSOR,
    DETECTOR_PLATFORM,
    DETECTOR_RUNTIME,
    FP8_TARGETS,
    HOST_SIZED_TARGETS,
    IMAGE_TENSOR,
    LABELS_FILE,
    LOCAL_INT8_COMPANIONS,
    MAX_QUEUE_DELAY_US,
    ONNX_VARIANT,
    PIXEL_INPUT_TARGETS,
    PRECISIONS,
    PRE_POST_INSTANCES,
    TARGETS,
    TRITON_DTYPE,
    default_precisions,
    detector_name,
    detector_template,
    ensemble_name,
)
from packager.repository.gpu_steps import (
    ENCODED_TENSOR,
    NMS_CHOICES,
    PREPROCESS_CHOICES,
    choose,
    ensemble_steps,
    gate_name,
    write_dali_model,
)

@dataclass(frozen=True)
class RepositoryResult:
    path: Path
    target: str
    model_name: str
    ensembles: dict[str, str]  # precision -> ensemble model name
    models: list[str] = field(default_factory=list)  # every Triton model rendered
    index: RepositoryIndex | None = None


@dataclass(frozen=True)
class RenderOptions:
    """How to serve a build: which target and precisions, batching and instance counts (None = per-target default)."""

    target: str = "local"
    precisions: tuple[str, ...] | None = None  # default_precisions(target)
    max_batch: int | None = None  # the manifest's max_batch
    preferred_batch_sizes: tuple[int, ...] | None = None
    max_queue_delay_us: int | None = None
    detector_instances: int = 1
    preprocess_instances: int | None = None
    postprocess_instances: int | None = None
    intra_op_threads: int = 0
    thresholds: Thresholds = PRODUCTION_THRESHOLDS
    max_pixels: int = letterbox_module.DEFAULT_MAX_PIXELS  # served pixel budget, checked from the image header
    reject_corrupt: bool = True  # refuse JPEG data libjpeg reports as corrupt
    runtime: str = runtime_module.DEFAULT_RUNTIME  # the local target's Python-backend detector: openvino|onnxruntime
    precision_hint: str = "f32"  # its OpenVINO precision: f32 keeps FP32 exact, bf16 is opt-in
    preprocess: str | None = None  # python | dali (gpu target only; default dali there, python elsewhere)
    nms: str | None = None  # python | graph (gpu target only, raw heads; default graph there)
    nms_spec: NmsSpec = NmsSpec()  # what an in-graph NMS compiles in (profiles, conf floor, rows)


def detector_runtime(template: str, options: RenderOptions, precision: Precision) -> str:
    """What executes the detector's math, as reports name it: the same ONNX scores differently under each.
    The local target serves on this machine, so its label is this CPU's choice (fallbacks included)."""
    if template == "local":
        runtime = runtime_module.RuntimeOptions(options.runtime, options.precision_hint)
        return runtime_module.runtime_on_this_machine(runtime, quantized=precision is Precision.INT8).label
    return DETECTOR_RUNTIME[template]


def render_repository(
    build_dir: Path,
    repository_dir: Path,
    target: str = "local",
    precisions: tuple[str, ...] | list[str] | None = None,
    max_batch: int | None = None,
    *,
    engines: dict[str, Path] | None = None,
    **options,
) -> RepositoryResult:
    """Render a repository for `target` serving each precision of the build in `build_dir` (see RenderOptions).

    `engines` maps precision -> TensorRT plan for the `gpu` target; without one the config is rendered and
    `model.plan` is expected later. Reads only the build's manifest and artifacts: never re-quantizes.
    """
    render_options = RenderOptions(target=target, precisions=tuple(precisions) if precisions else None,
                                   max_batch=max_batch, **options)
    return render(Path(build_dir), Path(repository_dir), render_options, engines)


def render(build_dir: Path, repository_dir: Path, options: RenderOptions,
           engines: dict[str, Path] | None = None) -> RepositoryResult:
    """The `render` stage: build directory + RenderOptions -> a Triton model repository, swapped in atomically."""
    manifest = BuildManifest.load(build_dir)
    plan = _plan(build_dir, manifest, options, engines)
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)), undefined=jinja2.StrictUndefined, keep_trailing_newline=True
    )
    repository_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{repository_dir.name}.rendering-", dir=repository_dir.parent))
    try:
        models = _render_pre_post(env, staging, plan) + _render_precisions(env, staging, plan)
        index = RepositoryIndex(manifest.model, options.target, tuple(models), options.thresholds._asdict(),
                                str(Path(build_dir).resolve()))
        index.save(staging)
        if options.target == "gpu":  # the engine check's onnxruntime side (packager/engines/check.py)
            from packager.engines.reference import write_check_references

            write_check_references(build_dir, staging)
        _keep_notes(repository_dir, staging)
        replace_directory(staging, repository_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return RepositoryResult(path=repository_dir, target=options.target, model_name=manifest.model.name,
                            ensembles={p.value: n for p, n in index.ensembles().items()},
                            models=[m.name for m in models], index=index)


def load_repository_index(repository_dir: Path) -> RepositoryIndex:
    return RepositoryIndex.load(repository_dir)


@dataclass(frozen=True)
class _Plan:
    """Everything decided before a file is written: a bad option fails before the repository is touched."""

    spec: ModelSpec
    options: RenderOptions
    precisions: tuple[Precision, ...]
    max_batch: int
    preferred: tuple[int, ...]
    max_queue_delay_us: int
    sources: dict[Precision, Path]
    plans: dict[Precision, Path]
    preprocess: str = "python"
    nms: dict | None = None  # NmsSpec.served(...) when the detector's graph ends in NMS
    # Files served beside the `local` INT8 detector's model.onnx: its u8-activation twin and self-check images,
    # from which the runtime picks what this CPU computes right (inference/int8_cpu.py).
    int8_companions: dict[str, Path] = field(default_factory=dict)

    @property
    def head_output(self) -> TensorSpec:
        """The detector output the postprocess reads: the head's, or the in-graph NMS rows."""
        if self.nms is None:
            return self.spec.output
        return TensorSpec(self.nms["output_name"], (-1, len(self.nms["profiles"]), self.nms["rows"], 6))

    @property
    def letterboxed(self) -> TensorSpec:
        """The detector input the ensemble feeds from the preprocess: the model's own, or its pixels."""
        if self.options.target in PIXEL_INPUT_TARGETS:
            return TensorSpec(f"{self.spec.input.name}_pixels", self.spec.input.shape, "uint8")
        return self.spec.input

    def common(self) -> dict:
        spec = self.spec
        return {
            "max_batch_size": self.max_batch,
            "input_name": spec.input.name,
            "input_dims": list(spec.input.dims),
            "letterboxed_name": self.letterboxed.name,
            "letterboxed_data_type": TRITON_DTYPE[self.letterboxed.dtype],
            "output_name": self.head_output.name,
            "output_dims": list(self.head_output.dims),
            "head_format": spec.head.value,
            "target": self.options.target,
            "model_name": spec.name,
        }


def _plan(build_dir: Path, manifest: BuildManifest, options: RenderOptions, engines) -> _Plan:
    target = options.target
    if target not in TARGETS:
        raise ConfigError(f"unknown target {target!r}: choose one of {', '.join(TARGETS)}")
    requested = options.precisions if options.precisions is not None else default_precisions(target)
    if not requested:
        raise ConfigError("no precision to serve: pass at least one of fp32, fp16, int8")
    unknown = [p for p in requested if p not in PRECISIONS]
    if unknown:
        raise ConfigError(f"unknown precision(s) {', '.join(unknown)}: choose from {', '.join(PRECISIONS)}")
    failed = [gate for gate in (manifest.evaluation.gates if manifest.evaluation is not None else ())
              if not gate.passed and gate.variant.split("-")[0] in requested]
    if failed:  # a build kept after a failed gate (<out>.failed-gate): its quantized models are not to be served
        ratios = ", ".join(f"{gate.variant} ratio {gate.ratio:.4f}" for gate in failed)
        precisions = ", ".join(sorted({gate.variant.split("-")[0] for gate in failed}))
        raise ConfigError(f"the build in {build_dir} failed its accuracy gate ({ratios}): its {precisions} model is "
                          "not served; render --precisions without it, or rebuild until the gate holds")
    unservable = [p for p in requested if p not in ONNX_VARIANT[target]]
    if unservable:
        raise ConfigError(f"{', '.join(unservable)} is served only on the {', '.join(FP8_TARGETS)} target (TensorRT, "
                          f"compute capability >= 8.9), not on {target}: serve fp32/fp16/int8 there")
    try:
        runtime_module.RuntimeOptions(options.runtime, options.precision_hint)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if not (TEMPLATES_DIR / "detector" / target / "config.pbtxt.j2").is_file():
        raise MissingInputError(f"no detector template for target {target!r} in {TEMPLATES_DIR / 'detector'}")
    spec = manifest.model
    check_model_name(spec.name)
    if int(options.max_pixels) < 1:
        raise ConfigError(f"max_pixels must be positive, got {options.max_pixels}")
    max_batch = int(options.max_batch or spec.max_batch or 8)
    if max_batch < 1:
        raise ConfigError(f"max_batch must be at least 1, got {max_batch}")
    preferred = tuple(sorted(set(options.preferred_batch_sizes or [b for b in (2, 4, 8) if b <= max_batch]
                                 or [max_batch])))
    if preferred[-1] > max_batch or preferred[0] < 1:
        raise ConfigError(f"preferred batch sizes {list(preferred)} must lie within 1..max_batch={max_batch}")
    if len(spec.input.dims) != 3 or min(spec.input.dims + spec.output.dims) < 1:
        raise ConfigError(f"manifest input/output shapes must be fixed except the batch: "
                          f"{list(spec.input.dims)}, {list(spec.output.dims)}")
    precisions = tuple(Precision(p) for p in dict.fromkeys(requested))
    sources = {p: _detector_source(build_dir, manifest, target, p.value) for p in precisions}
    plans = {}
    if target == "gpu":
        plans = {Precision(p): Path(plan) for p, plan in (engines or {}).items() if p in requested}
    for precision, plan in plans.items():
        if not plan.is_file():
            raise MissingInputError(f"TensorRT engine for {precision.value} not found: {plan}")
    delay = MAX_QUEUE_DELAY_US[target] if options.max_queue_delay_us is None else int(options.max_queue_delay_us)
    preprocess = choose("preprocess", options.preprocess, PREPROCESS_CHOICES, target)
    nms_choice = choose("nms", options.nms, NMS_CHOICES, target)
    nms = None
    if nms_choice == "graph" and spec.head is HeadFormat.RAW:  # an end2end head has no NMS to move
        nms = options.nms_spec.served(spec.output.dims[0] - 4, spec.output.dims[1])
    companions = {}
    if DETECTOR_PLATFORM[target] == "python" and Precision.INT8 in precisions:
        companions = {served: manifest.artifact_path(build_dir, variant)
                      for variant, served in LOCAL_INT8_COMPANIONS.items() if variant in manifest.artifacts}
    return _Plan(spec, options, precisions, max_batch, preferred, delay, sources, plans, preprocess, nms, companions)


# A checkout tracks model_repository/README.md (it says the folder is generated output); a re-render keeps it.
KEPT_NOTES = ("README.md",)


def _keep_notes(previous: Path, staging: Path) -> None:
    for name in KEPT_NOTES:
        if (previous / name).is_file():
            shutil.copy2(previous / name, staging / name)


def _render_pre_post(env: jinja2.Environment, staging: Path, plan: _Plan) -> list[ServedModel]:
    spec, options = plan.spec, plan.options
    pre, post = f"{spec.name}_preprocess", f"{spec.name}_postprocess"
    instances = PRE_POST_INSTANCES[options.target]
    common = plan.common()
    nms_json = _pbtxt_string(json.dumps(plan.nms, sort_keys=True)) if plan.nms else ""
    sized = options.target in HOST_SIZED_TARGETS

    def host_sized(kind: str, explicit: int | None) -> str:
        return kind if sized and explicit is None else ""

    letterboxed = TensorSpec("images", plan.letterboxed.shape, plan.letterboxed.dtype)
    info = TensorSpec("letterbox_info", (-1, 5))
    models = []
    if plan.preprocess == "dali":
        gate = gate_name(spec.name)
        _python_model(env, staging / gate, "gate", [image_header_module.__file__, request_params_module.__file__],
                      {**common, "name": gate, "instance_count": options.preprocess_instances or instances[1],
                       "role": Role.PREPROCESS.value, "precision": "", "max_pixels": int(options.max_pixels),
                       "nms_json": nms_json, "thresholds": options.thresholds,
                       "host_sized": host_sized("light", options.preprocess_instances)})
        height, width = spec.input.dims[1], spec.input.dims[2]
        dali_context = {**common, "name": pre, "role": Role.PREPROCESS.value, "precision": "",
                        "preferred_batch_sizes": list(plan.preferred), "max_queue_delay_us": plan.max_queue_delay_us}
        write_dali_model(staging / pre, height, width, plan.max_batch, dali_context,
                         lambda template, context, out: _render(env, template, context, out))
        models += [
            ServedModel(gate, Role.PREPROCESS, None, (IMAGE_TENSOR,), (ENCODED_TENSOR,), plan.max_batch,
                        platform="python"),
            ServedModel(pre, Role.PREPROCESS, None, (ENCODED_TENSOR,), (letterboxed, info), plan.max_batch,
                        plan.preferred, platform="dali"),
        ]
    else:
        _python_model(env, staging / pre, "preprocess",
                      [letterbox_module.__file__, image_header_module.__file__, request_params_module.__file__],
                      {**common, "name": pre, "instance_count": options.preprocess_instances or instances[0],
                       "role": Role.PREPROCESS.value, "precision": "", "max_pixels": int(options.max_pixels),
                       "reject_corrupt": bool(options.reject_corrupt),
                       "host_sized": host_sized("decode", options.preprocess_instances)})
        models.append(ServedModel(pre, Role.PREPROCESS, None, (IMAGE_TENSOR,), (letterboxed, info), plan.max_batch,
                                  platform="python"))
    _python_model(env, staging / post, "postprocess",
                  [letterbox_module.__file__, image_header_module.__file__, postprocess_module.__file__,
                   request_params_module.__file__],
                  {**common, "name": post, "instance_count": options.postprocess_instances or instances[1],
                   "thresholds": options.thresholds, "role": Role.POSTPROCESS.value, "precision": "",
                   "nms_json": nms_json,
                   "host_sized": host_sized("light" if plan.nms else "nms", options.postprocess_instances)})
    (staging / post / LABELS_FILE).write_text(_labels(spec))
    models.append(ServedModel(post, Role.POSTPROCESS, None, (plan.head_output, info), (DETECTIONS_TENSOR,),
                              plan.max_batch, platform="python"))
    return models


def _render_precisions(env: jinja2.Environment, staging: Path, plan: _Plan) -> list[ServedModel]:
    spec, options = plan.spec, plan.options
    target = options.target
    models = []
    for precision in plan.precisions:
        detector = detector_name(spec.name, precision.value)
        template = detector_template(target, precision.value)
        runtime = detector_runtime(template, options, precision)
        common = {**plan.common(), "precision": precision.value, "detector_runtime": runtime}
        context = {
            **common,
            "name": detector,
            "role": Role.DETECTOR.value,
            "preferred_batch_sizes": list(plan.preferred),
            "max_queue_delay_us": plan.max_queue_delay_us,
            "instance_count": options.detector_instances,
            "model_filename": "model.plan" if target == "gpu" else "model.onnx",
            "intra_op_threads": int(options.intra_op_threads),
            "runtime": options.runtime,
            "precision_hint": options.precision_hint,
            "ultralytics_metadata": ultralytics_metadata_pbtxt(spec),
            "tensorrt_builder_flags": target == "gpu-ort" and image_facts().tensorrt_major < 11,
        }
        if DETECTOR_PLATFORM[template] == "python":  # the local target: opens the model with yqpack's runtime.py
            _python_model(env, staging / detector, f"detector/{template}",
                          [runtime_module.__file__, int8_cpu_module.__file__, letterbox_module.__file__,
                           image_header_module.__file__], context)
        else:
            (staging / detector / "1").mkdir(parents=True)
            _render(env, f"detector/{template}/config.pbtxt.j2", context, staging / detector / "config.pbtxt")
        version_dir = staging / detector / "1"
        # gpu: model.onnx is the engine source; the engines step (or `engines`) writes model.plan beside it.
        if plan.nms is not None:
            write_nms_graph(plan.sources[precision], version_dir / "model.onnx", NmsSpec.from_dict(plan.nms))
        else:
            shutil.copy2(plan.sources[precision], version_dir / "model.onnx")
        if precision in plan.plans:
            shutil.copy2(plan.plans[precision], version_dir / "model.plan")
        if precision is Precision.INT8:
            for served, source in plan.int8_companions.items():
                shutil.copy2(source, version_dir / served)
        ensemble = ensemble_name(spec.name, precision.value)
        (staging / ensemble / "1").mkdir(parents=True)  # Triton wants a version folder, even empty
        _render(
            env,
            "ensemble/config.pbtxt.j2",
            {**common, "name": ensemble, "role": Role.ENSEMBLE.value, "preprocess_name": f"{spec.name}_preprocess",
             "steps": ensemble_steps(spec.name, plan.preprocess, plan.letterboxed.name, plan.head_output.name,
                                     detector),
             "class_names_pbtxt": _pbtxt_string(json.dumps(list(spec.class_names)))},
            staging / ensemble / "config.pbtxt",
        )
        (staging / ensemble / LABELS_FILE).write_text(_labels(spec))
        detector_inputs = (spec.input,) if plan.letterboxed == spec.input else (spec.input, plan.letterboxed)
        models += [
            ServedModel(detector, Role.DETECTOR, precision, detector_inputs, (plan.head_output,), plan.max_batch,
                        plan.preferred, ONNX_VARIANT[target][precision.value], DETECTOR_PLATFORM[template],
                        runtime, in_graph_nms=plan.nms),
            ServedModel(ensemble, Role.ENSEMBLE, precision, (IMAGE_TENSOR,), (DETECTIONS_TENSOR,), plan.max_batch,
                        platform="ensemble", runtime=runtime),
        ]
    return models


def _labels(spec: ModelSpec) -> str:
    return "\n".join(spec.class_names) + "\n"


def ultralytics_metadata_pbtxt(spec: ModelSpec) -> str:
    """`spec.ultralytics_metadata()` as a Python-literal dict (what Ultralytics' client parses), escaped for a
    double-quoted pbtxt string."""
    return repr(spec.ultralytics_metadata()).replace("\\", "\\\\").replace('"', '\\"')


def _pbtxt_string(text: str) -> str:
    """Escape text for a single-quoted protobuf text string."""
    return text.replace("\\", "\\\\").replace("'", "\\'")


def _detector_source(build_dir: Path, manifest: BuildManifest, target: str, precision: str) -> Path:
    """The ONNX a detector serves, or for `gpu` the ONNX its TensorRT engine is built from on the serving host."""
    variant = ONNX_VARIANT[target][precision]
    if variant not in manifest.artifacts:
        raise ConfigError(f"the build in {build_dir} has no {variant!r} model, needed to serve {precision} on {target}")
    return manifest.artifact_path(build_dir, variant)


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
