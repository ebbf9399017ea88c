"""TensorRT engines for the `gpu` target: trtexec command lines, the engine cache key, and the build loop.

A plan only loads under the exact TensorRT version and GPU compute capability that built it, so plans are built
on the serving host, by the serving image (deploy/docker-compose.yml's `engines` service runs
deploy/build_engines.py, which calls `main()` here). This module therefore uses the standard library only at
import time: the tritonserver image has no numpy/rich/click. Optional pieces (the TensorRT Python API, the
build manifest) are imported inside the functions that need them.

Cache key: (ONNX sha256, TensorRT version, compute capability), plus the optimization profile it was built
for, written next to the plan as `model.plan.key.json` (and into the build manifest by `record_engines`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from packager.contracts import EngineBuildError

PLAN_FILENAME = "model.plan"
SOURCE_ONNX_FILENAME = "model.onnx"  # the renderer (or stage_engine_sources) puts the source ONNX here
KEY_SUFFIX = ".key.json"
LOG_SUFFIX = ".log"
TRTEXEC_CANDIDATES = ("/usr/src/tensorrt/bin/trtexec", "/opt/tensorrt/bin/trtexec")
LOG_TAIL_LINES = 30
PRECISIONS = ("fp32", "fp16", "int8")


# --------------------------------------------------------------------------------------------- versions


@dataclass(frozen=True, order=True)
class TensorRTVersion:
    major: int
    minor: int
    patch: int = 0

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"

    @property
    def strongly_typed(self) -> bool:
        """TensorRT >= 10 builds explicitly typed networks; older ones need the legacy --fp16/--int8 flags."""
        return self.major >= 10

    @classmethod
    def parse(cls, text: str) -> "TensorRTVersion":
        parsed = parse_tensorrt_version(text)
        if parsed is None:
            raise ValueError(f"not a TensorRT version: {text!r} (expected e.g. 10.8.0)")
        return parsed


def parse_tensorrt_version(text: str) -> TensorRTVersion | None:
    """Read a TensorRT version from a dotted string ("10.8.0.43") or trtexec's banner ("[TensorRT v100800]")."""
    banner = re.search(r"TensorRT v(\d{4,6})\b", text)
    if banner:
        number = int(banner.group(1))
        # NV_TENSORRT_VERSION is major*1000+minor*100+patch before 10, major*10000+minor*100+patch from 10 on.
        if number >= 100000:
            return TensorRTVersion(number // 10000, (number // 100) % 100, number % 100)
        return TensorRTVersion(number // 1000, (number // 100) % 10, number % 100)
    dotted = re.fullmatch(r"\s*v?(\d+)\.(\d+)(?:\.(\d+))?(?:\.\d+)*\s*", text)
    if dotted:
        return TensorRTVersion(int(dotted.group(1)), int(dotted.group(2)), int(dotted.group(3) or 0))
    return None


def parse_compute_capability(nvidia_smi_output: str) -> str:
    """The first GPU's compute capability from `nvidia-smi --query-gpu=compute_cap --format=csv,noheader`."""
    for line in nvidia_smi_output.splitlines():
        match = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", line)
        if match:
            return f"{match.group(1)}.{match.group(2)}"
    raise ValueError(f"no compute capability in nvidia-smi output: {nvidia_smi_output.strip()[:200]!r}")


def detect_compute_capability() -> str:
    """The serving GPU's compute capability ($YQPACK_GPU_COMPUTE_CAPABILITY overrides), or a clear error."""
    override = os.environ.get("YQPACK_GPU_COMPUTE_CAPABILITY")
    if override:
        return parse_compute_capability(override)
    smi = shutil.which("nvidia-smi")
    if smi is None:
        raise EngineBuildError(
            "no NVIDIA GPU visible (nvidia-smi not found): TensorRT engines must be built on the GPU that serves "
            "them; run the compose `engines` service on the GPU host (see docs/gpu.md)"
        )
    run = subprocess.run(
        [smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True, text=True, timeout=60
    )
    if run.returncode != 0:
        raise EngineBuildError(f"nvidia-smi failed (exit {run.returncode}): {(run.stderr or run.stdout).strip()}")
    return parse_compute_capability(run.stdout)


def find_trtexec(explicit: str | os.PathLike | None = None) -> Path:
    """trtexec: the given path, $TRTEXEC, the image's usual places, then PATH."""
    candidates = [explicit, os.environ.get("TRTEXEC"), *TRTEXEC_CANDIDATES, shutil.which("trtexec")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise FileNotFoundError(
        "trtexec not found (looked at $TRTEXEC, " + ", ".join(TRTEXEC_CANDIDATES) + " and PATH). Run the engine "
        "build inside the tritonserver image (docker compose run engines) or set TRTEXEC to its path"
    )


def detect_tensorrt_version(trtexec: Path) -> TensorRTVersion:
    """TensorRT version of this trtexec ($YQPACK_TENSORRT_VERSION overrides), from the banner it prints first."""
    override = os.environ.get("YQPACK_TENSORRT_VERSION")
    if override:
        return TensorRTVersion.parse(override)
    run = subprocess.run([str(trtexec), "--help"], capture_output=True, text=True, timeout=120)
    version = parse_tensorrt_version(run.stdout + run.stderr)
    if version is None:
        raise EngineBuildError(f"could not read the TensorRT version from `{trtexec} --help`; set YQPACK_TENSORRT_VERSION")
    return version


# ------------------------------------------------------------------------------------------ detector specs


@dataclass(frozen=True)
class DetectorConfig:
    """What the engine build needs from a rendered detector config.pbtxt."""

    name: str
    backend: str  # "tensorrt" for tensorrt_plan configs
    max_batch_size: int
    input_name: str
    input_dims: tuple[int, ...]
    preferred_batch_sizes: tuple[int, ...] = ()

    @property
    def precision(self) -> str | None:
        match = re.search(r"_(fp32|fp16|int8)_detector$", self.name)
        return match.group(1) if match else None


def parse_detector_config(text: str) -> DetectorConfig:
    """Parse the fields of a Triton config.pbtxt the engine build needs (stdlib only: no protobuf in the image)."""
    text = re.sub(r"#[^\n]*", "", text)  # comments may mention any of the keys below
    name = re.search(r'^\s*name\s*:\s*"([^"]+)"', text, re.M)
    if name is None:
        raise ValueError("config.pbtxt has no model name")
    platform = re.search(r'^\s*platform\s*:\s*"([^"]+)"', text, re.M)
    backend = re.search(r'^\s*backend\s*:\s*"([^"]+)"', text, re.M)
    kind = "tensorrt" if is_tensorrt_config(text) else (backend.group(1) if backend else (platform.group(1) if platform else ""))
    max_batch = re.search(r"^\s*max_batch_size\s*:\s*(\d+)", text, re.M)
    inputs = re.search(r"\binput\s*\[(.*?)\]\s*\n\s*output\b", text, re.S)
    if inputs is None:
        raise ValueError(f"config of {name.group(1)} has no input section")
    input_name = re.search(r'name\s*:\s*"([^"]+)"', inputs.group(1))
    dims = re.search(r"dims\s*:\s*\[([^\]]*)\]", inputs.group(1))
    if input_name is None or dims is None:
        raise ValueError(f"config of {name.group(1)} lacks the input name or dims")
    preferred = re.search(r"preferred_batch_size\s*:\s*\[([^\]]*)\]", text)
    return DetectorConfig(
        name=name.group(1),
        backend=kind,
        max_batch_size=int(max_batch.group(1)) if max_batch else 0,
        input_name=input_name.group(1),
        input_dims=tuple(int(d) for d in dims.group(1).replace(" ", "").split(",") if d),
        preferred_batch_sizes=tuple(int(b) for b in preferred.group(1).replace(" ", "").split(",") if b)
        if preferred
        else (),
    )


@dataclass(frozen=True)
class EngineSpec:
    """One plan to build: which ONNX, where the plan goes, and the optimization profile."""

    name: str
    precision: str
    onnx_path: Path
    plan_path: Path
    input_name: str
    input_dims: tuple[int, ...]  # without the batch dimension
    min_batch: int
    opt_batch: int
    max_batch: int

    def shape(self, batch: int) -> str:
        return f"{self.input_name}:" + "x".join(str(d) for d in (batch, *self.input_dims))

    @property
    def profile(self) -> dict[str, str]:
        return {"min": self.shape(self.min_batch), "opt": self.shape(self.opt_batch), "max": self.shape(self.max_batch)}


def engine_spec(config: DetectorConfig, version_dir: Path, precision: str | None = None) -> EngineSpec:
    """The plan for one detector: profile 1 / largest preferred batch / max_batch_size (Triton never exceeds it)."""
    precision = precision or config.precision
    if precision not in PRECISIONS:
        raise ValueError(f"cannot tell the precision of {config.name} (expected a name ending _<fp32|fp16|int8>_detector)")
    max_batch = max(1, config.max_batch_size)
    opt = max([b for b in config.preferred_batch_sizes if b <= max_batch] or [max_batch])
    return EngineSpec(
        name=config.name,
        precision=precision,
        onnx_path=version_dir / SOURCE_ONNX_FILENAME,
        plan_path=version_dir / PLAN_FILENAME,
        input_name=config.input_name,
        input_dims=tuple(config.input_dims),
        min_batch=1,
        opt_batch=opt,
        max_batch=max_batch,
    )


def repository_engine_specs(repository: Path) -> list[EngineSpec]:
    """Every tensorrt_plan detector of a model repository (other models are not built here)."""
    repository = Path(repository)
    if not repository.is_dir():
        raise FileNotFoundError(f"model repository not found: {repository}")
    specs = []
    for config_path in sorted(repository.glob("*/config.pbtxt")):
        text = config_path.read_text()
        if is_tensorrt_config(text):  # python/ensemble/onnxruntime configs need no parsing here
            specs.append(engine_spec(parse_detector_config(text), config_path.parent / "1"))
    return specs


def is_tensorrt_config(text: str) -> bool:
    text = re.sub(r"#[^\n]*", "", text)
    return bool(re.search(r'^\s*(platform\s*:\s*"tensorrt_plan"|backend\s*:\s*"tensorrt")', text, re.M))


# ------------------------------------------------------------------------------------------- command lines


def trtexec_command(
    trtexec: str | os.PathLike,
    spec: EngineSpec,
    version: TensorRTVersion,
    plan_out: Path,
    timing_cache: Path | None = None,
) -> list[str]:
    """The trtexec invocation for one plan.

    TensorRT >= 10: `--stronglyTyped`, so each layer runs in the type the ONNX gives it (FP16 graph, ModelOpt
    INT8 Q/DQ with FP16 elsewhere); the legacy precision flags are deprecated there and removed in 11.
    TensorRT < 10: no strongly typed networks, so fall back to `--fp16` (and `--int8`, which honours the Q/DQ
    nodes as explicit quantization) and let the builder pick per layer.
    """
    command = [str(trtexec), f"--onnx={spec.onnx_path}", f"--saveEngine={plan_out}"]
    if version.strongly_typed:
        command.append("--stronglyTyped")
    else:
        command += legacy_precision_flags(spec.precision)
    profile = spec.profile
    command += [f"--minShapes={profile['min']}", f"--optShapes={profile['opt']}", f"--maxShapes={profile['max']}"]
    if timing_cache is not None:
        command.append(f"--timingCacheFile={timing_cache}")
    # Build only: the benchmark run after the build would cost minutes and is not needed to serve.
    command.append("--skipInference" if version >= TensorRTVersion(8, 6) else "--buildOnly")
    return command


def legacy_precision_flags(precision: str) -> list[str]:
    return {"fp32": [], "fp16": ["--fp16"], "int8": ["--fp16", "--int8"]}[precision]


def timing_cache_path(directory: Path, version: TensorRTVersion, compute_capability: str) -> Path:
    """Timing caches are as version/GPU bound as plans: one file per (TensorRT, compute capability)."""
    return Path(directory) / f"timing-trt{version}-sm{compute_capability.replace('.', '')}.cache"


# ---------------------------------------------------------------------------------------------- cache key


@dataclass(frozen=True)
class EngineKey:
    onnx_sha256: str
    tensorrt_version: str
    compute_capability: str
    profile: dict = field(default_factory=dict)  # a new max batch needs a new plan, too
    strongly_typed: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "EngineKey":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def engine_key(spec: EngineSpec, version: TensorRTVersion, compute_capability: str) -> EngineKey:
    return EngineKey(
        onnx_sha256=sha256_file(spec.onnx_path),
        tensorrt_version=str(version),
        compute_capability=compute_capability,
        profile=spec.profile,
        strongly_typed=version.strongly_typed,
    )


def key_path(plan_path: Path) -> Path:
    return plan_path.with_name(plan_path.name + KEY_SUFFIX)


def read_key(plan_path: Path) -> EngineKey | None:
    path = key_path(plan_path)
    try:
        return EngineKey.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None  # absent or unreadable: treat as "no valid cached plan"


def write_key(plan_path: Path, key: EngineKey) -> Path:
    path = key_path(plan_path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(key.to_dict(), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def cached_plan_is_valid(plan_path: Path, key: EngineKey) -> bool:
    """True when a non-empty plan exists and was built for exactly this key."""
    return plan_path.is_file() and plan_path.stat().st_size > 0 and read_key(plan_path) == key


# ------------------------------------------------------------------------------------------------- builds


@dataclass
class EngineResult:
    name: str
    precision: str
    status: str  # "built", "cached" or "failed"
    plan_path: Path
    key: EngineKey | None = None
    seconds: float = 0.0
    message: str = ""
    log_tail: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("built", "cached")


Runner = Callable[[Sequence[str], Path], int]  # (command, log file) -> exit code


def run_logged(command: Sequence[str], log_path: Path) -> int:
    """Run a builder with stdout+stderr going to log_path (kept for the user on failure)."""
    with open(log_path, "w") as log:
        return subprocess.run(list(command), stdout=log, stderr=subprocess.STDOUT).returncode


def tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def remove_plan(plan_path: Path) -> None:
    """No broken or stale plan is left behind: Triton must not load a plan that does not match its key."""
    for path in (plan_path, key_path(plan_path), plan_path.with_name(plan_path.name + ".building")):
        path.unlink(missing_ok=True)


def build_engine(
    spec: EngineSpec,
    trtexec: str | os.PathLike,
    version: TensorRTVersion,
    compute_capability: str,
    *,
    timing_cache: Path | None = None,
    runner: Runner = run_logged,
) -> EngineResult:
    """Build one plan unless a plan with the same key is already there. Never raises for a builder failure."""
    if not spec.onnx_path.is_file():
        remove_plan(spec.plan_path)
        return EngineResult(spec.name, spec.precision, "failed", spec.plan_path,
                            message=f"source ONNX missing: {spec.onnx_path}")
    key = engine_key(spec, version, compute_capability)
    if cached_plan_is_valid(spec.plan_path, key):
        return EngineResult(spec.name, spec.precision, "cached", spec.plan_path, key=key,
                            message="plan matches (ONNX sha256, TensorRT, compute capability, profile)")
    remove_plan(spec.plan_path)
    building = spec.plan_path.with_name(spec.plan_path.name + ".building")
    log_path = spec.plan_path.with_name(spec.plan_path.name + LOG_SUFFIX)
    command = trtexec_command(trtexec, spec, version, building, timing_cache)
    started = time.monotonic()
    try:
        code = runner(command, log_path)
    except OSError as error:  # e.g. trtexec vanished or is not executable
        log_path.write_text(f"{error}\n")
        code = 127
    seconds = time.monotonic() - started
    log_text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    if code != 0 or not building.is_file() or building.stat().st_size == 0:
        remove_plan(spec.plan_path)
        return EngineResult(spec.name, spec.precision, "failed", spec.plan_path, key=key, seconds=seconds,
                            message=f"trtexec exited with {code}" if code else "trtexec wrote no plan",
                            log_tail=tail(log_text))
    os.replace(building, spec.plan_path)  # atomic: Triton sees either no plan or a whole one
    write_key(spec.plan_path, key)
    mode = "strongly typed" if version.strongly_typed else "legacy " + " ".join(legacy_precision_flags(spec.precision))
    return EngineResult(spec.name, spec.precision, "built", spec.plan_path, key=key, seconds=seconds,
                        message=f"TensorRT {version} ({mode}), sm {compute_capability}")


def build_repository_engines(
    repository: Path,
    *,
    allow_missing: bool = False,
    trtexec: str | os.PathLike | None = None,
    version: TensorRTVersion | None = None,
    compute_capability: str | None = None,
    timing_cache_dir: Path | None = None,
    runner: Runner = run_logged,
    report: Callable[[str], None] = print,
) -> list[EngineResult]:
    """Build (or reuse) the plan of every tensorrt_plan detector in `repository`.

    Every detector is attempted so the user sees all failures at once; then, unless `allow_missing`, any
    failure raises EngineBuildError. With `allow_missing` the failed detectors are left without a plan and
    Triton starts without them (the compose file then relaxes --exit-on-error / --strict-readiness).
    """
    specs = repository_engine_specs(repository)
    if not specs:
        report(f"no tensorrt_plan detector in {repository}: nothing to build")
        return []
    trtexec = find_trtexec(trtexec) if runner is run_logged else Path(trtexec or "trtexec")
    version = version or detect_tensorrt_version(Path(trtexec))
    compute_capability = compute_capability or detect_compute_capability()
    if not version.strongly_typed:
        report(f"TensorRT {version} < 10 has no strongly typed builds: falling back to --fp16 / --fp16 --int8 "
               "with the Q/DQ model (builder-chosen precisions)")
    results = []
    for spec in specs:
        cache = timing_cache_path(timing_cache_dir or spec.plan_path.parent, version, compute_capability)
        report(f"{spec.name}: {spec.precision} plan, profile {spec.profile['min']} .. {spec.profile['max']}")
        result = build_engine(spec, trtexec, version, compute_capability, timing_cache=cache, runner=runner)
        results.append(result)
        report(f"{spec.name}: {result.status} ({result.message}{', %.0f s' % result.seconds if result.seconds else ''})")
        if not result.ok and result.log_tail:
            report(f"--- last lines of the builder log ({result.plan_path.name}{LOG_SUFFIX}) ---\n{result.log_tail}")
    failed = [r for r in results if not r.ok]
    if failed and not allow_missing:
        raise EngineBuildError(failure_summary(failed) + " (pass --allow-missing to serve without them)")
    if failed:
        report(failure_summary(failed) + ": --allow-missing given, Triton will start without them")
    return results


def failure_summary(failed: list[EngineResult]) -> str:
    return f"{len(failed)} engine build(s) failed: " + ", ".join(f"{r.name} ({r.message})" for r in failed)


# --------------------------------------------------------------------------- optional: TensorRT Python API


def tensorrt_api_status() -> tuple[bool, str]:
    """Whether `--engines local` can run here: the tensorrt package imports and a CUDA GPU is visible."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return False, ("the `tensorrt` Python package is not installed here; build the engines on the GPU host "
                       "with the compose path instead: docker compose -f deploy/docker-compose.yml run --rm engines")
    try:
        detect_compute_capability()
    except EngineBuildError as error:
        return False, f"{error}"
    return True, "tensorrt and a GPU are available"


def build_engine_with_tensorrt_api(spec: EngineSpec, timing_cache: Path | None = None) -> Path:
    """Same settings as trtexec_command, through the TensorRT Python API (strongly typed on TensorRT >= 10)."""
    import tensorrt as trt  # optional dependency, only on GPU hosts

    version = TensorRTVersion.parse(trt.__version__)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if version.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    else:
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
                                   report: Callable[[str], None] = print) -> list[EngineResult]:
    """`--engines local`: the same cache-keyed loop, built in-process with the TensorRT Python API."""
    available, reason = tensorrt_api_status()
    if not available:
        raise EngineBuildError(reason)
    import tensorrt as trt

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
                                    version=version, runner=runner, report=report)


# ------------------------------------------------------------------------------- build-env side: manifest


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
    manifest_path = Path(build_dir) / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no manifest.json in {build_dir}: run `yqpack build` first")
    manifest = json.loads(manifest_path.read_text())
    manifest["engines"] = collect_engine_keys(repository)
    tmp = manifest_path.with_name(manifest_path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, manifest_path)
    return manifest["engines"]


def stage_engine_sources(build_dir: Path, repository: Path) -> list[Path]:
    """Copy each gpu detector's source ONNX (fp16 -> model.fp16.onnx, int8 -> model.int8.onnx) to <detector>/1/."""
    from packager.repository import ONNX_VARIANT  # build env only

    manifest_path = Path(build_dir) / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no manifest.json in {build_dir}: run `yqpack build` first")
    artifacts = json.loads(manifest_path.read_text()).get("artifacts", {})
    staged = []
    for spec in repository_engine_specs(repository):
        variant = ONNX_VARIANT["gpu"][spec.precision]
        if variant not in artifacts:
            raise ValueError(f"the build in {build_dir} has no {variant!r} model, needed for {spec.name}")
        source = Path(build_dir) / artifacts[variant]["path"]
        if not source.is_file():
            raise FileNotFoundError(f"{variant} model missing: {source}")
        if not spec.onnx_path.is_file() or sha256_file(spec.onnx_path) != sha256_file(source):
            spec.onnx_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, spec.onnx_path)
        staged.append(spec.onnx_path)
    return staged


# ------------------------------------------------------------------------------ entry (in the image too)


def main(argv: Sequence[str] | None = None) -> int:
    """`python3 deploy/build_engines.py /models`: build every plan of a repository with trtexec."""
    parser = argparse.ArgumentParser(description="Build the TensorRT plans of a yqpack model repository.")
    parser.add_argument("repository", type=Path)
    parser.add_argument("--allow-missing", action="store_true",
                        default=os.environ.get("YQPACK_ALLOW_MISSING", "0").lower() in ("1", "true", "yes"),
                        help="exit 0 even when an engine fails (Triton then starts without that model)")
    parser.add_argument("--trtexec", default=None, help="trtexec path (default: $TRTEXEC or the image's)")
    parser.add_argument("--timing-cache-dir", type=Path, default=None, help="where timing caches are kept")
    args = parser.parse_args(argv)
    try:
        results = build_repository_engines(
            args.repository, allow_missing=args.allow_missing, trtexec=args.trtexec,
            timing_cache_dir=args.timing_cache_dir,
        )
    except (EngineBuildError, FileNotFoundError, ValueError) as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1
    built = sum(r.status == "built" for r in results)
    cached = sum(r.status == "cached" for r in results)
    print(f"engines: {built} built, {cached} reused, {len(results) - built - cached} failed")
    return 0
