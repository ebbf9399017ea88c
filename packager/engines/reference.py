"""The build side of the engine check (packager/engines/check.py): Polygraphy's onnxruntime outputs of each gpu
detector's reference ONNX on a few calibration images, saved into the repository for the GPU host to compare its
plans with. Runs in the build env (numpy, onnxruntime, polygraphy), when a gpu repository is rendered."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from packager.core.contracts import EngineBuildError
from packager.core.manifest import BuildManifest
from packager.engines.check import CHECK_INPUTS, REFERENCE_FILENAME, REFERENCE_VARIANT, reference_command
from packager.engines.plans import repository_engine_specs

CHECK_IMAGES = 2  # calibration images per check: each is one Polygraphy iteration at batch 1


def polygraphy_executable() -> str:
    """The `polygraphy` of this Python environment (pyproject pins it), else the one on PATH."""
    beside = Path(sys.executable).parent / "polygraphy"
    found = str(beside) if beside.is_file() else shutil.which("polygraphy")
    if found is None:
        raise EngineBuildError("polygraphy is not installed in this environment (pip install -e . installs the "
                               "pinned version): it writes the engine check's onnxruntime reference")
    return found


def write_check_inputs(build_dir: Path, repository: Path, images: int = CHECK_IMAGES) -> Path:
    """The first `images` letterboxed calibration images, in Polygraphy's input format (one feed per iteration)."""
    from polygraphy.json import save_json

    manifest = BuildManifest.load(build_dir)
    calibration = np.load(manifest.artifact_path(build_dir, "calib"), mmap_mode="r")[:images]
    feeds = [{manifest.model.input.name: np.ascontiguousarray(image[None], dtype=np.float32)} for image in calibration]
    path = Path(repository) / CHECK_INPUTS
    save_json(feeds, str(path), description="engine check inputs")
    return path


def write_check_references(build_dir: Path, repository: Path, images: int = CHECK_IMAGES) -> list[Path]:
    """Inputs plus one reference per TensorRT detector (`<detector>/1/model.check-reference.json`)."""
    specs = repository_engine_specs(repository)
    if not specs:
        return []
    from packager.core.repository_index import RepositoryIndex
    from packager.export.nms_graph import NmsSpec, write_nms_graph

    manifest = BuildManifest.load(build_dir)
    index = RepositoryIndex.load(repository)
    inputs = write_check_inputs(build_dir, repository, images)
    polygraphy = polygraphy_executable()
    written = []
    for spec in specs:
        variant = REFERENCE_VARIANT[spec.precision]
        if variant not in manifest.artifacts:
            raise EngineBuildError(f"the build in {build_dir} has no {variant!r} model, the onnxruntime reference "
                                   f"of the {spec.precision} plan's engine check")
        out = spec.plan_path.parent / REFERENCE_FILENAME
        source = manifest.artifact_path(build_dir, variant)
        nms = index.get(spec.name).in_graph_nms
        if nms is not None:  # the plan ends in the in-graph NMS (docs/gpu-prepost.md): so does its reference
            source = write_nms_graph(source, spec.plan_path.parent / f"check-reference.{variant}.nms.onnx",
                                     NmsSpec.from_dict(nms))
        command = reference_command(source, inputs, out, spec.precision, polygraphy)
        run = subprocess.run(command, capture_output=True, text=True)
        if nms is not None:
            source.unlink()
        if run.returncode != 0 or not out.is_file():
            raise EngineBuildError(f"polygraphy could not write the onnxruntime reference of {spec.name} (exit "
                                   f"{run.returncode}):\n" + "\n".join((run.stdout + run.stderr).splitlines()[-15:]))
        written.append(out)
    return [inputs, *written]
