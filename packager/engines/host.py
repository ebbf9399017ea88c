"""The engine stage's host side, never shipped into the serving image: `--engines local` (the TensorRT Python API
on this host's GPU), staging each detector's source ONNX from the build, and recording engine keys in the manifest.

The cache-keyed build loop itself lives in engines.py, the plans and their keys in engine_plans.py (standard
library only, run by the serving image).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

from packager.core.contracts import EngineBuildError, ManifestError
from packager.core.manifest import BuildManifest
from packager.core.files import sha256_file
from packager.engines.plans import EngineSpec, TensorRTVersion, read_key, repository_engine_specs
from packager.engines.builder import EngineResult, build_repository_engines, detect_gpu, legacy_precision_flags, tail


# --------------------------------------------------------------------------- optional: TensorRT Python API


def tensorrt_api_status() -> tuple[bool, str]:
    """Whether `--engines local` can run here: the tensorrt package imports and a CUDA GPU is visible."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return False, ("the `tensorrt` Python package is not installed here; build the engines on the GPU host "
                       "with the compose path instead: docker compose -f deploy/docker-compose.yml run --rm engines")
    try:
        detect_gpu()
    except EngineBuildError as error:
        return False, f"{error}"
    return True, "tensorrt and a GPU are available"


def build_engine_with_tensorrt_api(spec: EngineSpec, timing_cache: Path | None = None) -> Path:
    """Same settings as trtexec_command, through the TensorRT Python API (strongly typed on TensorRT >= 10)."""
    import tensorrt as trt  # optional dependency, only on GPU hosts

    version = TensorRTVersion.parse(trt.__version__)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0  # TensorRT 11: strongly typed is the only mode (its STRONGLY_TYPED flag is deprecated, a no-op)
    if version.strongly_typed and not version.strongly_typed_by_default:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    elif not version.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(spec.onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"{spec.name}: TensorRT could not parse {spec.onnx_path}:\n{tail(errors)}")
    config = builder.create_builder_config()
    if not version.strongly_typed:
        for flag in legacy_precision_flags(spec.precision):
            config.set_flag(trt.BuilderFlag.FP16 if flag == "--fp16" else trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    shapes = [(b, *spec.input_dims) for b in (spec.min_batch, spec.opt_batch, spec.max_batch)]
    profile.set_shape(spec.input_name, *shapes)
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"{spec.name}: TensorRT failed to build the engine (see the TensorRT log above)")
    building = spec.plan_path.with_name(spec.plan_path.name + ".building")
    building.write_bytes(bytes(serialized))
    os.replace(building, spec.plan_path)
    if timing_cache is not None:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return spec.plan_path


def build_repository_engines_local(repository: Path, *, allow_missing: bool = False,
                                   plugins: Sequence[str | os.PathLike] = (),
                                   report: Callable[[str], None] = print) -> list[EngineResult]:
    """`--engines local`: the same cache-keyed loop, built in-process with the TensorRT Python API."""
    available, reason = tensorrt_api_status()
    if not available:
        raise EngineBuildError(reason)
    import ctypes

    import tensorrt as trt

    for library in plugins:  # registers the library's plugin creators, as trtexec --staticPlugins does
        ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)

    version = TensorRTVersion.parse(trt.__version__)

    def runner(command: Sequence[str], log_path: Path) -> int:
        spec = next(s for s in specs if f"--onnx={s.onnx_path}" in command)
        plan_out = Path(next(a for a in command if a.startswith("--saveEngine=")).split("=", 1)[1])
        cache = next((Path(a.split("=", 1)[1]) for a in command if a.startswith("--timingCacheFile=")), None)
        try:
            build_engine_with_tensorrt_api(
                EngineSpec(**{**asdict(spec), "plan_path": plan_out}), timing_cache=cache
            )
        except EngineBuildError as error:
            log_path.write_text(f"{error}\n")
            return 1
        log_path.write_text("built with the TensorRT Python API\n")
        return 0

    specs = repository_engine_specs(repository)
    return build_repository_engines(repository, allow_missing=allow_missing, trtexec="tensorrt-python-api",
                                    version=version, plugins=plugins, runner=runner, report=report)


# ------------------------------------------------------------------------------- build-env side: manifest


def trt_plugin_libraries(build_dir: Path | None = None, environ: dict[str, str] | None = None) -> list[Path]:
    """Plugin libraries to build and serve with: $YQPACK_TRT_PLUGINS (':'-separated), else the build's own
    `--trt-plugins` from manifest.json (paths on the machine that built it), else none."""
    environ = os.environ if environ is None else environ
    if environ.get("YQPACK_TRT_PLUGINS"):
        return [Path(p) for p in environ["YQPACK_TRT_PLUGINS"].split(os.pathsep) if p.strip()]
    if build_dir is not None:
        quantization = BuildManifest.load(build_dir).quantization
        return [Path(p) for p in quantization.trt_plugins] if quantization is not None else []
    return []



def collect_engine_keys(repository: Path) -> dict[str, dict]:
    """Detector name -> key record of every plan present in the repository."""
    keys = {}
    for spec in repository_engine_specs(repository):
        key = read_key(spec.plan_path)
        if key is not None and spec.plan_path.is_file():
            keys[spec.name] = {**key.to_dict(), "precision": spec.precision, "plan": str(spec.plan_path)}
    return keys


def record_engines(build_dir: Path, repository: Path) -> dict[str, dict]:
    """Write the engine keys found in `repository` into the build manifest's `engines` entry."""
    manifest = BuildManifest.load(build_dir)
    manifest.engines = collect_engine_keys(repository)
    manifest.save(build_dir)
    return manifest.engines


def stage_engine_sources(build_dir: Path, repository: Path) -> list[Path]:
    """Copy each gpu detector's source ONNX (the artifact its index entry names) to <detector>/1/model.onnx; a
    detector with an in-graph NMS (its index entry's in_graph_nms) gets the artifact with that NMS appended."""
    from packager.core.repository_index import RepositoryIndex
    from packager.export.nms_graph import NmsSpec, write_nms_graph

    manifest = BuildManifest.load(build_dir)
    index = RepositoryIndex.load(repository)
    staged = []
    for spec in repository_engine_specs(repository):
        if spec.artifact is None:
            raise ManifestError(f"the repository index names no build artifact for {spec.name}: render it again")
        source = manifest.artifact_path(build_dir, spec.artifact)
        nms = index.get(spec.name).in_graph_nms
        if nms is not None:
            derived = spec.onnx_path.with_name(spec.onnx_path.name + ".staging")
            write_nms_graph(source, derived, NmsSpec.from_dict(nms))
            source = derived
        if not spec.onnx_path.is_file() or sha256_file(spec.onnx_path) != sha256_file(source):
            spec.onnx_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, spec.onnx_path)
        if nms is not None:
            source.unlink()
        staged.append(spec.onnx_path)
    return staged
