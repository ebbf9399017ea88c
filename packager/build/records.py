"""What a build records about itself: artifact hashes and tool versions. The manifest object, its reader and
writer live in packager/core/contracts.py (`BuildManifest`); these helpers fill it."""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path

from packager.core.contracts import ARTIFACT_FILES, MANIFEST_NAME, Artifact, BuildManifest
from packager.core.files import sha256_file

__all__ = ["ARTIFACT_FILES", "MANIFEST_NAME", "artifact_entries", "artifact_path", "library_versions", "sha256_file"]

_VERSIONED_PACKAGES = {
    "yqpack": "yqpack",
    "ultralytics": "ultralytics",
    "modelopt": "nvidia-modelopt",
    "onnx": "onnx",
    "onnxruntime": "onnxruntime-gpu",
    "torch": "torch",
    "numpy": "numpy",
}


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for key, distribution in _VERSIONED_PACKAGES.items():
        try:
            versions[key] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            versions[key] = None
    if versions["onnxruntime"] is None:  # a plain onnxruntime install (never beside onnxruntime-gpu)
        try:
            versions["onnxruntime"] = metadata.version("onnxruntime")
        except metadata.PackageNotFoundError:
            pass
    return versions


def artifact_entries(build_dir: str | Path, variants=tuple(ARTIFACT_FILES)) -> dict[str, Artifact]:
    """{variant: Artifact(path, sha256)} for the artifacts present in `build_dir`."""
    build_dir = Path(build_dir)
    return {
        variant: Artifact(ARTIFACT_FILES[variant], sha256_file(build_dir / ARTIFACT_FILES[variant]))
        for variant in variants
        if (build_dir / ARTIFACT_FILES[variant]).is_file()
    }


def artifact_path(build_dir: str | Path, variant: str) -> Path:
    """Absolute path of an artifact (`fp32`, `fp16`, `int8`, `int8-fp32`, `calib`, ...) listed in the manifest."""
    return BuildManifest.load(build_dir).artifact_path(build_dir, variant)
