"""manifest.json of a build directory: what was built, from what, with which tools (keys in docs/architecture.md)."""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path

MANIFEST_NAME = "manifest.json"
ONNX_VARIANTS = ("fp32", "fp16", "int8", "int8-fp32", "fp8", "fp8-fp32")
# Relative paths inside a build directory, per artifact variant.
ARTIFACT_FILES = {
    "fp32": "onnx/model.fp32.onnx",
    "fp16": "onnx/model.fp16.onnx",
    "int8": "onnx/model.int8.onnx",
    "int8-fp32": "onnx/model.int8-fp32.onnx",
    "fp8": "onnx/model.fp8.onnx",  # only with --fp8 (TensorRT, compute capability >= 8.9)
    "fp8-fp32": "onnx/model.fp8-fp32.onnx",
    "calib": "calib.npy",
}
_VERSIONED_PACKAGES = {
    "yqpack": "yqpack",
    "ultralytics": "ultralytics",
    "modelopt": "nvidia-modelopt",
    "onnx": "onnx",
    "onnxruntime": "onnxruntime-gpu",
    "torch": "torch",
    "numpy": "numpy",
}


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def artifact_entries(build_dir: str | Path, variants=tuple(ARTIFACT_FILES)) -> dict[str, dict[str, str]]:
    """{variant: {path, sha256}} for the artifacts present in `build_dir`."""
    build_dir = Path(build_dir)
    entries = {}
    for variant in variants:
        relative = ARTIFACT_FILES[variant]
        if (build_dir / relative).is_file():
            entries[variant] = {"path": relative, "sha256": sha256_file(build_dir / relative)}
    return entries


def write_manifest(build_dir: str | Path, manifest: dict) -> Path:
    """Write manifest.json atomically (a reader polling for it never sees half a file)."""
    path = Path(build_dir) / MANIFEST_NAME
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(manifest, indent=2) + "\n")
    partial.replace(path)
    return path


def load_manifest(build_dir: str | Path) -> dict:
    path = Path(build_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {build_dir}: is it a `yqpack build` output directory?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def artifact_path(build_dir: str | Path, variant: str) -> Path:
    """Absolute path of an artifact (`fp32`, `fp16`, `int8`, `int8-fp32`, `calib`) listed in the manifest."""
    manifest = load_manifest(build_dir)
    artifacts = manifest.get("artifacts", {})
    if variant not in artifacts:
        raise KeyError(f"build {build_dir} has no {variant!r} artifact (has: {', '.join(artifacts) or 'none'})")
    path = Path(build_dir) / artifacts[variant]["path"]
    if not path.is_file():
        raise FileNotFoundError(f"artifact {variant!r} listed in the manifest is missing: {path}")
    return path
