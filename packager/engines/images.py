"""The serving image's version facts, read from their one place: deploy/.env (the shell environment overrides it,
as for docker compose). Standard library only.

Only the TensorRT *major* version is used before the image runs (which trtexec options exist, whether the
gpu-ort configs may ask for builder precision flags); the engines step reads the exact major.minor.patch.build
from the image's own trtexec and says so when it differs from what deploy/.env declares.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from packager.core.contracts import ConfigError

FACT_VARIABLES = {
    "image_name": "TRITON_IMAGE_NAME", "tag": "TRITON_TAG", "triton": "TRITON_VERSION",
    "tensorrt": "TRITON_TENSORRT_VERSION", "cuda": "TRITON_CUDA_VERSION", "driver": "TRITON_DRIVER_MINIMUM",
    "onnxruntime": "TRITON_ONNXRUNTIME_VERSION", "openvino": "TRITON_OPENVINO_VERSION",
}


@dataclass(frozen=True)
class ImageFacts:
    image_name: str
    tag: str
    triton: str
    tensorrt: str  # as declared: "11" (major only) or "10.8.0.43"
    cuda: str
    driver: str
    onnxruntime: str
    openvino: str

    @property
    def image(self) -> str:
        return f"{self.image_name}:{self.tag}"

    @property
    def tensorrt_major(self) -> int:
        match = re.match(r"\s*(\d+)", self.tensorrt)
        if match is None:
            raise ConfigError(f"TRITON_TENSORRT_VERSION={self.tensorrt!r} in deploy/.env is not a version")
        return int(match.group(1))


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as docker compose reads them (comments and blank lines skipped, no interpolation)."""
    values = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        values[key.strip()] = value.strip().strip('"').strip("'")
    return values


def image_facts(env_file: Path | None = None, environ: dict[str, str] | None = None) -> ImageFacts:
    from packager.core.paths import DEPLOY_DIR

    values = read_env_file(env_file or DEPLOY_DIR / ".env")
    environ = os.environ if environ is None else environ
    values.update({k: environ[k] for k in FACT_VARIABLES.values() if environ.get(k)})
    missing = [v for v in FACT_VARIABLES.values() if not values.get(v)]
    if missing:
        raise ConfigError(f"deploy/.env does not set {', '.join(missing)} (the serving image's version facts)")
    return ImageFacts(**{field: values[variable] for field, variable in FACT_VARIABLES.items()})
