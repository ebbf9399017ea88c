"""What one TensorRT plan is: the detector it serves (`EngineSpec`, read from the repository index), the TensorRT
version that builds it, and the cache key that says whether a plan on disk still fits (`EngineKey`).

Standard library only, like engines.py: the serving image's bare Python imports it (deploy/build_engines.py).

Cache key: (ONNX sha256, TensorRT major.minor.patch.build, serving image, GPU name (with its MIG profile), compute
capability, TensorRT plugin libraries, optimization profile, trtexec command line), written next to the plan as
`model.plan.key.json` (and into the build manifest by `engine_host.record_engines`). TensorRT's support policy reuses
a plan only under the same major.minor.patch.build and GPU model, so all of them are part of the key.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from packager.core.contracts import ConfigError, ManifestError, MissingInputError, Role
from packager.engines.gpu_probe import GpuInfo
from packager.core.files import sha256_file
from packager.core.repository_index import RepositoryIndex, ServedModel

PLAN_FILENAME = "model.plan"
SOURCE_ONNX_FILENAME = "model.onnx"  # the renderer (or stage_engine_sources) puts the source ONNX here
KEY_SUFFIX = ".key.json"
CHECK_SUFFIX = ".check.json"
ENGINES_OUTCOME = "yqpack_engines.json"  # what the engines step did, per detector (builder.write_outcome)
BUILDING_SUFFIX = ".building"  # + a per-builder tag: two builders sharing a volume never write the same file
TENSORRT_PLATFORM = "tensorrt_plan"  # the index platform of detectors served from a TensorRT plan


# --------------------------------------------------------------------------------------------- versions


@dataclass(frozen=True, order=True)
class TensorRTVersion:
    major: int
    minor: int
    patch: int = 0
    build: int = 0  # trtexec's banner "[b43]"; 0 where unknown (a version given by hand without it)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"

    @property
    def full(self) -> str:
        """major.minor.patch.build, what TensorRT requires to match for a plan to be reused."""
        return f"{self}.{self.build}" if self.build else str(self)

    @property
    def strongly_typed(self) -> bool:
        """TensorRT >= 10 builds explicitly typed networks; older ones need the legacy --fp16/--int8 flags."""
        return self.major >= 10

    @property
    def strongly_typed_by_default(self) -> bool:
        """TensorRT 11 removed weak typing: `--stronglyTyped` is a deprecated no-op there (trtexec v11.1 help)."""
        return self.major >= 11

    @classmethod
    def parse(cls, text: str) -> "TensorRTVersion":
        parsed = parse_tensorrt_version(text)
        if parsed is None:
            raise ConfigError(f"not a TensorRT version: {text!r} (expected e.g. 10.8.0)")
        return parsed


def parse_tensorrt_version(text: str) -> TensorRTVersion | None:
    """Read a TensorRT version from a dotted string ("10.8.0.43") or trtexec's banner
    ("[TensorRT v100800] [b43]": samples/common/logging.h prints NV_TENSORRT_VERSION and NV_TENSORRT_BUILD)."""
    banner = re.search(r"TensorRT v(\d{4,6})\b\]?(?:\s*\[b(\d+)\])?", text)
    if banner:
        number, build = int(banner.group(1)), int(banner.group(2) or 0)
        # NV_TENSORRT_VERSION is major*1000+minor*100+patch before 10, major*10000+minor*100+patch from 10 on.
        if number >= 100000:
            return TensorRTVersion(number // 10000, (number // 100) % 100, number % 100, build)
        return TensorRTVersion(number // 1000, (number // 100) % 10, number % 100, build)
    dotted = re.fullmatch(r"\s*v?(\d+)\.(\d+)(?:\.(\d+))?(?:\.(\d+))?\s*", text)
    if dotted:
        return TensorRTVersion(int(dotted.group(1)), int(dotted.group(2)), int(dotted.group(3) or 0),
                               int(dotted.group(4) or 0))
    return None


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


# ---------------------------------------------------------------------------------------------- cache key


@dataclass(frozen=True)
class EngineKey:
    onnx_sha256: str
    tensorrt_version: str  # major.minor.patch.build where the image's trtexec tells the build number
    compute_capability: str
    gpu_name: str = ""  # plans are tied to the GPU model (a MIG slice: with its profile), not only its compute capability
    profile: dict = field(default_factory=dict)  # a new max batch needs a new plan, too
    strongly_typed: bool = True
    plugins: list = field(default_factory=list)  # "<file name>:<sha256>" of each TensorRT plugin library
    image: str = ""  # the serving image that built it ($YQPACK_SERVING_IMAGE), "" when unknown (a host trtexec)
    command: list = field(default_factory=list)  # the trtexec arguments, paths of this build replaced by their names

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "EngineKey":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def engine_key(spec: EngineSpec, version: TensorRTVersion, gpu: GpuInfo,
               plugins: Sequence[str | os.PathLike] = (), *, image: str = "",
               command: Sequence[str] = ()) -> EngineKey:
    return EngineKey(
        onnx_sha256=sha256_file(spec.onnx_path),
        tensorrt_version=version.full,
        compute_capability=gpu.compute_capability,
        gpu_name=gpu.name,
        profile=spec.profile,
        strongly_typed=version.strongly_typed,
        plugins=[f"{Path(p).name}:{sha256_file(Path(p))}" for p in plugins],
        image=image,
        command=key_command(command),
    )


def key_command(command: Sequence[str]) -> list[str]:
    """trtexec's arguments as the key keeps them: the paths that differ between two builds of the same plan (the
    temporary plan name, the repository's mount point, the timing cache folder) become their file names."""
    kept = []
    for argument in list(command)[1:]:
        option, _, value = argument.partition("=")
        if option == "--saveEngine":
            argument = f"{option}={PLAN_FILENAME}"
        elif option in ("--onnx", "--timingCacheFile"):
            argument = f"{option}={Path(value).name}"
        kept.append(argument)
    return kept


def key_path(plan_path: Path) -> Path:
    return plan_path.with_name(plan_path.name + KEY_SUFFIX)


def check_path(plan_path: Path) -> Path:
    """The engine check's verdict on this plan (packager/engines/check.py), beside it like the key."""
    return plan_path.with_name(plan_path.name + CHECK_SUFFIX)


def read_key(plan_path: Path) -> EngineKey | None:
    path = key_path(plan_path)
    try:
        return EngineKey.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None  # absent or unreadable: treat as "no valid cached plan"


def write_key(plan_path: Path, key: EngineKey) -> Path:
    return write_json_atomically(key_path(plan_path), key.to_dict())


def write_json_atomically(path: Path, data: dict) -> Path:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: replicas may share the volume
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def cached_plan_is_valid(plan_path: Path, key: EngineKey) -> bool:
    """True when a non-empty plan exists and was built for exactly this key."""
    return plan_path.is_file() and plan_path.stat().st_size > 0 and read_key(plan_path) == key


def timing_cache_path(directory: Path, version: TensorRTVersion, compute_capability: str) -> Path:
    """Timing caches are as version/GPU bound as plans: one file per (TensorRT, compute capability)."""
    return Path(directory) / f"timing-trt{version}-sm{compute_capability.replace('.', '')}.cache"
