"""What `yqpack verify` reads before it sends a request: the image folder (decoded with the server's decoder) and
the facts the server's configs, the run's build (reference.py) or a detached server's repository index state about
the models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from packager.metrics import coco_eval
from packager.core.contracts import MissingInputError, StateFileError, VerifyError
from packager.inference.letterbox import decode_image
from packager.core.repository_index import RepositoryIndex


@dataclass
class SkippedImage:
    file: str
    reason: str


@dataclass
class ImageSet:
    load_payloads: list[bytes]  # every decodable image in the folder
    accuracy_files: list[Path]  # decodable and annotated
    accuracy_payloads: list[bytes]
    folder_files: int
    skipped: list[SkippedImage]
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # accuracy file name -> decoded (width, height)


def scan_images(images_dir: Path, ground_truth: coco_eval.CocoGroundTruth, max_images: int | None) -> ImageSet:
    """Read every file of the folder once; undecodable or unannotated files are listed, not silently dropped."""
    if not images_dir.is_dir():
        raise MissingInputError(f"image folder not found: {images_dir}")
    files = sorted(path for path in images_dir.iterdir() if path.is_file() and not path.name.startswith("."))
    return scan_files(files, ground_truth, max_images, str(images_dir))


def scan_files(files: list[Path], ground_truth: coco_eval.CocoGroundTruth, max_images: int | None,
               where: str) -> ImageSet:
    """`scan_images` of a list of image files (a dataset YAML's split: `where` names it in messages)."""
    by_name = {path.name: path for path in files}
    skipped: list[SkippedImage] = []
    readable: dict[str, bytes] = {}
    sizes: dict[str, tuple[int, int]] = {}
    for path in files:
        try:
            data = path.read_bytes()
            height, width = decode_image(data).shape[:2]  # the server's decoder: what fails here fails there
        except (OSError, ValueError) as error:
            skipped.append(SkippedImage(path.name, f"unreadable, excluded: {error}"))
            continue
        readable[path.name] = data
        sizes[path.name] = (int(width), int(height))
        if path.name not in ground_truth.image_ids:
            skipped.append(SkippedImage(path.name, "not in the annotation file: load test only"))
    annotated = [name for name in ground_truth.image_ids if name in readable]
    if max_images is not None:
        annotated = annotated[:max_images]
    if not annotated:
        raise VerifyError(
            f"no readable image of {ground_truth.path.name} in {where} "
            f"({len(files)} file(s), {len(readable)} readable)"
        )
    return ImageSet(
        load_payloads=list(readable.values()),
        accuracy_files=[by_name[name] for name in annotated],
        accuracy_payloads=[readable[name] for name in annotated],
        folder_files=len(files),
        skipped=skipped,
        sizes={name: sizes[name] for name in annotated},
    )


def served_identity(config: dict) -> tuple[str, str]:
    """(model family, precision) from the `yqpack_model` / `yqpack_precision` parameters yqpack renders into each
    config; an ensemble rendered elsewhere is its own family with precision "unknown" (names are not parsed)."""
    family = config_parameter(config, "yqpack_model") or config.get("name", "")
    return family, config_parameter(config, "yqpack_precision") or "unknown"


def parse_class_names(value: str) -> list[str]:
    """A config parameter holding class names: a JSON list, or one name per line / comma-separated."""
    value = value.strip()
    if value.startswith("["):
        names = json.loads(value)
    elif "\n" in value:
        names = value.splitlines()
    else:
        names = value.split(",")
    return [str(name).strip() for name in names if str(name).strip()]


def config_parameter(config: dict, key: str) -> str | None:
    return config.get("parameters", {}).get(key, {}).get("string_value")


def served_class_names(name: str, configs: dict[str, dict], build_names: tuple[list[str], str] | None,
                       url: str) -> tuple[list[str], str]:
    """Class names of ensemble `name` and where they come from: a `class_names` parameter in its config or a step's
    (`configs`, the ensemble's first), else the run's build's (`build_names`: its manifest's names and path), else
    a detached yqpack serve's index."""
    for holder, config in configs.items():
        value = config_parameter(config, "class_names")
        if value:
            return parse_class_names(value), f"config parameter class_names of {holder}"
    if build_names is not None:
        names, source = build_names
        if not names:
            raise VerifyError(f"{source} has no class_names")
        return list(names), source
    names, source = detached_server_class_names(url)
    if names is None:
        raise VerifyError(
            f"{name}: the served configs carry no class_names parameter; pass --build DIR so the "
            "manifest's class names map class ids to COCO categories"
        )
    return names, source


def detached_server_class_names(url: str) -> tuple[list[str] | None, str]:
    """Class names of the repository a detached `yqpack serve` on this machine serves at `url`, if any."""
    from packager.serve.records import read_state

    try:
        state = read_state()
        if state is None or state.grpc_url != url.replace("localhost", "127.0.0.1"):
            return None, ""
        names = list(RepositoryIndex.load(Path(state.repository)).model.class_names)
    except (OSError, ValueError, TypeError, StateFileError):  # no or unreadable record: just no fallback
        return None, ""
    return (names, f"{state.repository} (detached yqpack serve)") if names else (None, "")
