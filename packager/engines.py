"""TensorRT engines for the `gpu` target: trtexec command lines, the engine cache key, and the build loop.

A plan only loads under the exact TensorRT version and GPU compute capability that built it, so plans are built
on the serving host, by the serving image (deploy/docker-compose.yml's `engines` service runs
deploy/build_engines.py, which calls `main()` here). This module therefore uses the standard library only at
import time: the tritonserver image has no numpy/rich/click. Optional pieces (the TensorRT Python API, the
build manifest) are imported inside the functions that need them.

Cache key: (ONNX sha256, TensorRT version, GPU name, compute capability, TensorRT plugin libraries), plus the
optimization profile it was built for, written next to the plan as `model.plan.key.json` (and into the build
manifest by `record_engines`). Plans are tied to the exact GPU model, not only to its compute capability.
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

from packager import gpu_probe
from packager.contracts import (
    ConfigError,
    EngineBuildError,
    ManifestError,
    MissingInputError,
    RepositoryIndex,
    Role,
    ServedModel,
)
from packager.gpu_probe import GpuInfo

PLAN_FILENAME = "model.plan"
SOURCE_ONNX_FILENAME = "model.onnx"  # the renderer (or stage_engine_sources) puts the source ONNX here
KEY_SUFFIX = ".key.json"
LOG_SUFFIX = ".log"
TRTEXEC_CANDIDATES = ("/usr/src/tensorrt/bin/trtexec", "/opt/tensorrt/bin/trtexec")
LOG_TAIL_LINES = 30
TENSORRT_PLATFORM = "tensorrt_plan"  # the index platform of detectors served from a TensorRT plan


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
            raise ConfigError(f"not a TensorRT version: {text!r} (expected e.g. 10.8.0)")
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


def detect_gpu() -> GpuInfo:
    """The serving GPU (name + compute capability, packager/gpu_probe.py); GpuProbeError (an EngineBuildError)
    says what to set when nothing can tell."""
    return gpu_probe.detect_gpu()


def find_trtexec(explicit: str | os.PathLike | None = None) -> Path:
    """trtexec: the given path, $TRTEXEC, the image's usual places, then PATH."""
    candidates = [explicit, os.environ.get("TRTEXEC"), *TRTEXEC_CANDIDATES, shutil.which("trtexec")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise MissingInputError(
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
    artifact: str | None = None  # the build artifact variant the plan is built from (e.g. int8)

    def shape(self, batch: int) -> str:
        return f"{self.input_name}:" + "x".join(str(d) for d in (batch, *self.input_dims))

    @property
    def profile(self) -> dict[str, str]:
        return {"min": self.shape(self.min_batch), "opt": self.shape(self.opt_batch), "max": self.shape(self.max_batch)}


def engine_spec(model: ServedModel, version_dir: Path) -> EngineSpec:
    """The plan for one detector: profile 1 / largest preferred batch / max_batch_size (Triton never exceeds it)."""
    if model.precision is None or not model.inputs:
        raise ManifestError(f"the repository index lists {model.name} without a precision or an input")
    max_batch = max(1, model.max_batch_size)
    opt = max([b for b in model.preferred_batch_sizes if b <= max_batch] or [max_batch])
    tensor = model.inputs[0]
    return EngineSpec(
        name=model.name,
        precision=model.precision.value,
        onnx_path=version_dir / SOURCE_ONNX_FILENAME,
        plan_path=version_dir / PLAN_FILENAME,
        input_name=tensor.name,
        input_dims=tuple(tensor.dims),
        min_batch=1,
        opt_batch=opt,
        max_batch=max_batch,
        artifact=model.artifact,
    )


def repository_engine_specs(repository: Path) -> list[EngineSpec]:
    """Every TensorRT-plan detector the repository index lists (other models need no engine build)."""
    repository = Path(repository)
    if not repository.is_dir():
        raise MissingInputError(f"model repository not found: {repository}")
    index = RepositoryIndex.load(repository)
    return [engine_spec(model, repository / model.name / "1") for model in index.by_role(Role.DETECTOR)
            if model.platform == TENSORRT_PLATFORM]


# ------------------------------------------------------------------------------------------- command lines


def trtexec_command(
    trtexec: str | os.PathLike,
    spec: EngineSpec,
    version: TensorRTVersion,
    plan_out: Path,
    timing_cache: Path | None = None,
    plugins: Sequence[str | os.PathLike] = (),
) -> list[str]:
    """The trtexec invocation for one plan.

    TensorRT >= 10: `--stronglyTyped`, so each layer runs in the type the ONNX gives it (FP16 graph, ModelOpt
    INT8 Q/DQ with FP16 elsewhere); the legacy precision flags are deprecated there and removed in 11.
    TensorRT < 10: no strongly typed networks, so fall back to `--fp16` (and `--int8`, which honours the Q/DQ
    nodes as explicit quantization) and let the builder pick per layer.
    Plugin libraries load with `--staticPlugins` (TensorRT >= 8.6; `--plugins` before, deprecated since): the
    plan then needs the same library at load time, which Triton gets through --backend-config=tensorrt,plugins=.
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
    plugin_flag = "--staticPlugins" if version >= TensorRTVersion(8, 6) else "--plugins"
    command += [f"{plugin_flag}={library}" for library in plugins]
    # Build only: the benchmark run after the build would cost minutes and is not needed to serve.
    command.append("--skipInference" if version >= TensorRTVersion(8, 6) else "--buildOnly")
    return command


def legacy_precision_flags(precision: str) -> list[str]:
    return {"fp32": [], "fp16": ["--fp16"], "int8": ["--fp16", "--int8"], "fp8": ["--fp16", "--fp8"]}[precision]


def timing_cache_path(directory: Path, version: TensorRTVersion, compute_capability: str) -> Path:
    """Timing caches are as version/GPU bound as plans: one file per (TensorRT, compute capability)."""
    return Path(directory) / f"timing-trt{version}-sm{compute_capability.replace('.', '')}.cache"


# ---------------------------------------------------------------------------------------------- cache key


@dataclass(frozen=True)
class EngineKey:
    onnx_sha256: str
    tensorrt_version: str
    compute_capability: str
    gpu_name: str = ""  # plans are tied to the GPU model, not only its compute capability
    profile: dict = field(default_factory=dict)  # a new max batch needs a new plan, too
    strongly_typed: bool = True
    plugins: list = field(default_factory=list)  # "<file name>:<sha256>" of each TensorRT plugin library

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


def engine_key(spec: EngineSpec, version: TensorRTVersion, gpu: GpuInfo,
               plugins: Sequence[str | os.PathLike] = ()) -> EngineKey:
    return EngineKey(
        onnx_sha256=sha256_file(spec.onnx_path),
        tensorrt_version=str(version),
        compute_capability=gpu.compute_capability,
        gpu_name=gpu.name,
        profile=spec.profile,
        strongly_typed=version.strongly_typed,
        plugins=[f"{Path(p).name}:{sha256_file(Path(p))}" for p in plugins],
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


def fp8_supported(compute_capability: str) -> bool:
    """FP8 tensor cores: Ada (8.9), Hopper (9.0), Blackwell (10.x, 12.x)."""
    try:
        major, minor = (int(part) for part in compute_capability.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (8, 9)


def build_engine(
    spec: EngineSpec,
    trtexec: str | os.PathLike,
    version: TensorRTVersion,
    gpu: GpuInfo,
    *,
    timing_cache: Path | None = None,
    plugins: Sequence[str | os.PathLike] = (),
    runner: Runner = run_logged,
) -> EngineResult:
    """Build one plan unless a plan with the same key is already there. Never raises for a builder failure."""
    if not spec.onnx_path.is_file():
        remove_plan(spec.plan_path)
        return EngineResult(spec.name, spec.precision, "failed", spec.plan_path,
                            message=f"source ONNX missing: {spec.onnx_path}")
    if spec.precision == "fp8" and not fp8_supported(gpu.compute_capability):
        remove_plan(spec.plan_path)
        return EngineResult(spec.name, spec.precision, "failed", spec.plan_path,
                            message=f"FP8 needs compute capability >= 8.9 (Ada, Hopper, Blackwell); this GPU is "
                                    f"sm {gpu.compute_capability}: serve int8/fp16 (or --allow-missing)")
    key = engine_key(spec, version, gpu, plugins)
    if cached_plan_is_valid(spec.plan_path, key):
        return EngineResult(spec.name, spec.precision, "cached", spec.plan_path, key=key,
                            message="plan matches (ONNX sha256, TensorRT, GPU, plugins, profile)")
    remove_plan(spec.plan_path)
    building = spec.plan_path.with_name(spec.plan_path.name + ".building")
    log_path = spec.plan_path.with_name(spec.plan_path.name + LOG_SUFFIX)
    command = trtexec_command(trtexec, spec, version, building, timing_cache, plugins)
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
                        message=f"TensorRT {version} ({mode}), {gpu.name} sm {gpu.compute_capability}")


def build_repository_engines(
    repository: Path,
    *,
    allow_missing: bool = False,
    trtexec: str | os.PathLike | None = None,
    version: TensorRTVersion | None = None,
    gpu: GpuInfo | None = None,
    timing_cache_dir: Path | None = None,
    plugins: Sequence[str | os.PathLike] = (),
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
    gpu = gpu or detect_gpu()
    report(f"GPU: {gpu.name}, compute capability {gpu.compute_capability} (from {gpu.source})")
    missing = [str(p) for p in plugins if not Path(p).is_file()]
    if missing:
        raise EngineBuildError(f"TensorRT plugin librar{'y' if len(missing) == 1 else 'ies'} not found: "
                               + ", ".join(missing) + " (is the plugin folder mounted at /plugins?)")
    if not version.strongly_typed:
        report(f"TensorRT {version} < 10 has no strongly typed builds: falling back to --fp16 / --fp16 --int8 "
               "with the Q/DQ model (builder-chosen precisions)")
    results = []
    for spec in specs:
        cache = timing_cache_path(timing_cache_dir or spec.plan_path.parent, version, gpu.compute_capability)
        report(f"{spec.name}: {spec.precision} plan, profile {spec.profile['min']} .. {spec.profile['max']}")
        result = build_engine(spec, trtexec, version, gpu, timing_cache=cache, plugins=plugins, runner=runner)
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
    parser.add_argument("--plugins", default="",
                        help="TensorRT plugin libraries separated by ';' (as Triton's tensorrt plugins= setting)")
    args = parser.parse_args(argv)
    try:
        results = build_repository_engines(
            args.repository, allow_missing=args.allow_missing, trtexec=args.trtexec,
            timing_cache_dir=args.timing_cache_dir, plugins=[p for p in args.plugins.split(";") if p.strip()],
        )
    except (EngineBuildError, FileNotFoundError, ValueError) as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1
    built = sum(r.status == "built" for r in results)
    cached = sum(r.status == "cached" for r in results)
    print(f"engines: {built} built, {cached} reused, {len(results) - built - cached} failed")
    return 0
