"""TensorRT engines for the `gpu` target: find trtexec, its command lines, and the build loop.

A plan only loads under the exact TensorRT version and GPU compute capability that built it, so plans are built
on the serving host, by the serving image (deploy/docker-compose.yml's `engines` service runs
deploy/build_engines.py, which calls `main()` here). This module therefore uses the standard library only at
import time, and so do the modules it imports (contracts, gpu_probe, engine_plans): the tritonserver image has
no numpy/rich/click. Optional pieces (the TensorRT Python API, the build manifest) are imported inside the
functions that need them. What a plan is and its cache key live in engine_plans.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from packager.engines import gpu_probe
from packager.core.contracts import EngineBuildError, MissingInputError
from packager.engines.plans import (
    BUILDING_SUFFIX,
    ENGINES_OUTCOME,
    PLAN_FILENAME,
    EngineKey,
    EngineSpec,
    TensorRTVersion,
    cached_plan_is_valid,
    check_path,
    engine_key,
    key_path,
    parse_tensorrt_version,
    repository_engine_specs,
    timing_cache_path,
    write_json_atomically,
    write_key,
)
from packager.engines.gpu_probe import GpuInfo

LOG_SUFFIX = ".log"
PLAN_CACHE_DIRNAME = ".yqpack-plans"  # the plan cache's folder on a shared (Kubernetes) volume
TRTEXEC_CANDIDATES = ("/usr/src/tensorrt/bin/trtexec", "/opt/tensorrt/bin/trtexec")
LOG_TAIL_LINES = 30


# ----------------------------------------------------------------------------------------- host toolchain


def detect_gpu() -> GpuInfo:
    """The serving GPU (name + compute capability, packager/engines/gpu_probe.py); GpuProbeError (an EngineBuildError)
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


# ------------------------------------------------------------------------------------------- command lines


def trtexec_command(
    trtexec: str | os.PathLike,
    spec: EngineSpec,
    version: TensorRTVersion,
    plan_out: Path,
    timing_cache: Path | None = None,
    plugins: Sequence[str | os.PathLike] = (),
) -> list[str]:
    """The trtexec invocation for one plan (every option checked against samples/common/sampleOptions.cpp of
    TensorRT v10.8.0 and v11.1).

    TensorRT 11: strongly typed is the only mode (`--stronglyTyped` is a deprecated no-op, `--fp16/--int8/--best`
    are gone), so no precision option at all: each layer runs in the type the ONNX gives it. TensorRT 10:
    `--stronglyTyped` (FP16 graph, ModelOpt INT8 Q/DQ with FP16 elsewhere). TensorRT < 10: no strongly typed
    networks, so fall back to `--fp16` (and `--int8`, which honours the Q/DQ nodes as explicit quantization).
    Plugin libraries load with `--staticPlugins` (TensorRT >= 8.6; `--plugins` before, deprecated since): the
    plan then needs the same library at load time, which Triton gets through --backend-config=tensorrt,plugins=.
    """
    command = [str(trtexec), f"--onnx={spec.onnx_path}", f"--saveEngine={plan_out}"]
    if version.strongly_typed and not version.strongly_typed_by_default:
        command.append("--stronglyTyped")
    elif not version.strongly_typed:
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


# ------------------------------------------------------------------------------------------------- builds


@dataclass
class EngineResult:
    name: str
    precision: str
    status: str  # "built", "cached", "skipped" (this GPU cannot run it: by design, not an error) or "failed"
    plan_path: Path
    key: EngineKey | None = None
    seconds: float = 0.0
    message: str = ""
    log_tail: str = ""

    @property
    def ok(self) -> bool:
        """Nothing went wrong: a plan is there, or the detector was skipped on purpose (Triton does not load it)."""
        return self.status in ("built", "cached", "skipped")

    @property
    def served(self) -> bool:
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
    for path in (plan_path, key_path(plan_path), check_path(plan_path), building_path(plan_path)):
        path.unlink(missing_ok=True)


def building_path(plan_path: Path) -> Path:
    """Where this builder writes the plan before renaming it into place: named per host and process, so replicas
    sharing one volume never write into each other's half-built plan."""
    tag = f"{socket.gethostname()}-{os.getpid()}"
    return plan_path.with_name(f"{plan_path.name}{BUILDING_SUFFIX}.{tag}")


def cache_entry(plan_cache: Path, key: EngineKey) -> Path:
    """One folder per key: plans of two GPU models (or TensorRT builds) never meet."""
    digest = hashlib.sha256(json.dumps(key.to_dict(), sort_keys=True).encode()).hexdigest()[:32]
    return Path(plan_cache) / digest


def fetch_cached_plan(plan_cache: Path, key: EngineKey, plan_path: Path) -> bool:
    entry = cache_entry(plan_cache, key)
    if not cached_plan_is_valid(entry / PLAN_FILENAME, key):
        return False
    building = building_path(plan_path)
    shutil.copyfile(entry / PLAN_FILENAME, building)
    os.replace(building, plan_path)
    write_key(plan_path, key)
    return True


def publish_plan(plan_cache: Path, key: EngineKey, plan_path: Path) -> None:
    """Copy a new plan into the shared cache; replicas racing on the same key each replace it whole."""
    entry = cache_entry(plan_cache, key)
    entry.mkdir(parents=True, exist_ok=True)
    building = building_path(entry / PLAN_FILENAME)
    shutil.copyfile(plan_path, building)
    os.replace(building, entry / PLAN_FILENAME)
    write_key(entry / PLAN_FILENAME, key)


def copy_repository(source: Path, target: Path) -> Path:
    """A pod's own copy of a shared repository, without plans or their records: each pod serves plans made for
    its own GPU (built, or taken from the plan cache by their key), never another replica's."""
    shutil.copytree(source, target, dirs_exist_ok=True, symlinks=True,
                    ignore=shutil.ignore_patterns(f"{PLAN_FILENAME}*", PLAN_CACHE_DIRNAME, ENGINES_OUTCOME))
    return Path(target)


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
    image: str = "",
    plan_cache: Path | None = None,
) -> EngineResult:
    """Build one plan unless a plan with the same key is already there (beside the ONNX, or in `plan_cache`, a
    folder shared by the replicas of a Kubernetes Deployment). Never raises for a builder failure."""
    if spec.precision == "fp8" and not fp8_supported(gpu.compute_capability):
        remove_plan(spec.plan_path)  # Triton is never asked to load it (packager/engines/serving.py)
        return EngineResult(spec.name, spec.precision, "skipped", spec.plan_path,
                            message=f"FP8 needs compute capability >= 8.9 (Ada, Hopper, Blackwell); this GPU "
                                    f"({gpu.name}) is sm {gpu.compute_capability}: not built, Triton serves the "
                                    "other precisions")
    if not spec.onnx_path.is_file():
        remove_plan(spec.plan_path)
        return EngineResult(spec.name, spec.precision, "failed", spec.plan_path,
                            message=f"source ONNX missing: {spec.onnx_path}")
    building = building_path(spec.plan_path)
    command = trtexec_command(trtexec, spec, version, building, timing_cache, plugins)
    key = engine_key(spec, version, gpu, plugins, image=image, command=command)
    if cached_plan_is_valid(spec.plan_path, key):
        return EngineResult(spec.name, spec.precision, "cached", spec.plan_path, key=key,
                            message="plan matches (ONNX sha256, TensorRT build, image, GPU, plugins, profile, "
                                    "trtexec command line)")
    remove_plan(spec.plan_path)
    if plan_cache is not None and fetch_cached_plan(plan_cache, key, spec.plan_path):
        return EngineResult(spec.name, spec.precision, "cached", spec.plan_path, key=key,
                            message=f"plan of the same key from {plan_cache}")
    log_path = spec.plan_path.with_name(spec.plan_path.name + LOG_SUFFIX)
    started = time.monotonic()
    try:
        code = runner(command, log_path)
    except OSError as error:  # e.g. trtexec vanished or is not executable
        log_path.write_text(f"{error}\n")
        code = 127
    seconds = time.monotonic() - started
    log_text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    if code != 0 or not building.is_file() or building.stat().st_size == 0:
        building.unlink(missing_ok=True)
        remove_plan(spec.plan_path)
        return EngineResult(spec.name, spec.precision, "failed", spec.plan_path, key=key, seconds=seconds,
                            message=f"trtexec exited with {code}" if code else "trtexec wrote no plan",
                            log_tail=tail(log_text))
    os.replace(building, spec.plan_path)  # atomic: Triton sees either no plan or a whole one
    write_key(spec.plan_path, key)
    if plan_cache is not None:
        publish_plan(plan_cache, key, spec.plan_path)
    mode = "strongly typed" if version.strongly_typed else "legacy " + " ".join(legacy_precision_flags(spec.precision))
    return EngineResult(spec.name, spec.precision, "built", spec.plan_path, key=key, seconds=seconds,
                        message=f"TensorRT {version.full} ({mode}), {gpu.name} sm {gpu.compute_capability}")


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
    image: str | None = None,
    plan_cache: Path | None = None,
) -> list[EngineResult]:
    """Build (or reuse) the plan of every tensorrt_plan detector in `repository`.

    Every detector is attempted so the user sees all failures at once; then, unless `allow_missing`, any
    failure raises EngineBuildError. With `allow_missing` the failed detectors are left without a plan and
    Triton starts without them. Skipped detectors (FP8 below compute capability 8.9) are never a failure. Either way
    Triton is never asked to load a detector without a plan: packager/engines/serving.py leaves them (and their
    ensembles) out of what it serves. The outcome of every detector goes to ENGINES_OUTCOME in the repository.
    """
    specs = repository_engine_specs(repository)
    image = os.environ.get("YQPACK_SERVING_IMAGE", "") if image is None else image
    if not specs:
        report(f"no tensorrt_plan detector in {repository}: nothing to build")
        return []
    trtexec = find_trtexec(trtexec) if runner is run_logged else Path(trtexec or "trtexec")
    version = version or detect_tensorrt_version(Path(trtexec))
    gpu = gpu or detect_gpu()
    report(f"GPU: {gpu.name}, compute capability {gpu.compute_capability} (from {gpu.source}); "
           f"TensorRT {version.full}" + (f", image {image}" if image else ""))
    declared = os.environ.get("YQPACK_DECLARED_TENSORRT", "").strip()
    if declared and not f"{version.full}.".startswith(f"{declared}."):
        report(f"note: deploy/.env declares TensorRT {declared} for this image; it has {version.full} (the plans "
               "follow the image; correct TRITON_TENSORRT_VERSION in deploy/.env)")
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
        result = build_engine(spec, trtexec, version, gpu, timing_cache=cache, plugins=plugins, runner=runner,
                              image=image, plan_cache=plan_cache)
        results.append(result)
        report(f"{spec.name}: {result.status} ({result.message}{', %.0f s' % result.seconds if result.seconds else ''})")
        if not result.ok and result.log_tail:
            report(f"--- last lines of the builder log ({result.plan_path.name}{LOG_SUFFIX}) ---\n{result.log_tail}")
    write_outcome(repository, results, version, gpu, image)
    failed = [r for r in results if not r.ok]
    if failed and not allow_missing:
        raise EngineBuildError(failure_summary(failed) + " (pass --allow-missing to serve without them)")
    if failed:
        report(failure_summary(failed) + ": --allow-missing given, Triton will start without them")
    return results


def write_outcome(repository: Path, results: list[EngineResult], version: TensorRTVersion, gpu: GpuInfo,
                  image: str) -> Path:
    """What the engines step did, for the serving side's messages (`yqpack_engines.json`: a file, which Triton's
    repository scan ignores)."""
    return write_json_atomically(Path(repository) / ENGINES_OUTCOME, {
        "tensorrt_version": version.full, "gpu_name": gpu.name, "compute_capability": gpu.compute_capability,
        "image": image,
        "detectors": {r.name: {"status": r.status, "precision": r.precision, "message": r.message} for r in results},
    })


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
    parser.add_argument("--copy-from", type=Path, default=None,
                        help="a shared repository to copy into REPOSITORY first, without its plans (Kubernetes)")
    parser.add_argument("--plan-cache", type=Path, default=None,
                        help="a folder shared by replicas: plans by their key, reused by pods of the same GPU model")
    args = parser.parse_args(argv)
    try:
        if args.copy_from is not None:
            copy_repository(args.copy_from, args.repository)
        results = build_repository_engines(
            args.repository, allow_missing=args.allow_missing, trtexec=args.trtexec,
            timing_cache_dir=args.timing_cache_dir, plugins=[p for p in args.plugins.split(";") if p.strip()],
            plan_cache=args.plan_cache,
        )
    except (EngineBuildError, FileNotFoundError, ValueError) as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1
    from packager.engines.host_sizing import host_cores, size_python_steps

    sized = size_python_steps(args.repository)  # this host's cores: render could not know them
    if sized:
        print(f"python steps sized for {host_cores()} cores: " + ", ".join(f"{m} x{n}" for m, n in sized.items()))
    counts = {status: sum(r.status == status for r in results) for status in ("built", "cached", "skipped", "failed")}
    print(f"engines: {counts['built']} built, {counts['cached']} reused, {counts['skipped']} skipped on this GPU, "
          f"{counts['failed']} failed")
    return 0
