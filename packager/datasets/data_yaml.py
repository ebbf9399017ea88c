"""An Ultralytics dataset YAML (data.yaml), read as Ultralytics 8.4.190 reads it, so a dataset that trains there
evaluates here: `check_det_dataset` (root and split paths), `BaseDataset.get_img_files` (images of a split) and
`img2label_paths` (where each image's labels are), all in ultralytics/data/.

Where Ultralytics would guess or drop something silently, yqpack refuses with the file and line instead:
- a relative `path:` is tried against the YAML's folder first, then the current directory (Ultralytics: the current
  directory, then the `datasets_dir` of its settings file, which yqpack does not read);
- a list file's line that is not an image, or does not exist, is an error (Ultralytics drops or skips it);
- class names must be distinct (classes are matched to a model's by name).
`train:` is not required: evaluation reads only the split it scores.
"""

from __future__ import annotations

import glob
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from packager.core.contracts import ConfigError, MissingInputError

# Ultralytics 8.4.190's ultralytics.data.utils.IMG_FORMATS: a split's images are its files with these extensions.
IMG_FORMATS = frozenset({"avif", "bmp", "dng", "heic", "heif", "jp2", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp"})
SPLITS = ("train", "val", "test")
_KEY_TYPES = {"path": (str,), "train": (str, list), "val": (str, list), "test": (str, list), "names": (list, dict)}


def is_image_name(name: str) -> bool:
    return name.rpartition(".")[-1].lower() in IMG_FORMATS


def label_path(image: str | Path) -> Path:
    """Ultralytics' rule: the last `/images/` of the path becomes `/labels/`, the extension `.txt`."""
    images, labels = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return Path(labels.join(os.fspath(image).rsplit(images, 1)).rsplit(".", 1)[0] + ".txt")


@dataclass(frozen=True)
class DataYaml:
    """A data.yaml with its root and split entries resolved (folders or image-list files; checked when read)."""

    yaml_path: Path
    root: Path
    names: list[str]
    splits: dict[str, tuple[Path, ...]]  # split -> resolved entries; absent or empty in the YAML: not a key
    key_lines: dict[str, int] = field(default_factory=dict, compare=False)  # top-level key -> line, for messages

    def where(self, key: str | None = None) -> str:
        line = self.key_lines.get(key) if key else None
        return f"{self.yaml_path}, line {line}" if line else str(self.yaml_path)

    def split_images(self, split: str) -> list[Path]:
        """The split's image files, sorted by path as Ultralytics sorts them."""
        if split not in SPLITS:
            raise ConfigError(f"split {split!r} is not one of {', '.join(SPLITS)}")
        entries = self.splits.get(split)
        if not entries:
            listed = [name for name in SPLITS if self.splits.get(name)]
            raise ConfigError(f"{self.yaml_path} has no '{split}:' split (it has: {', '.join(listed) or 'none'})")
        files: list[str] = []
        for entry in entries:
            if entry.is_dir():
                pattern = os.path.join(glob.escape(str(entry)), "**", "*.*")
                files += [name for name in glob.glob(pattern, recursive=True) if is_image_name(name)]
            elif entry.is_file():
                files += _listed_images(entry)
            else:
                raise ConfigError(f"{self.where(split)}: '{split}:' {entry} does not exist (dataset root {self.root})")
        if not files:
            raise ConfigError(f"{self.where(split)}: '{split}:' has no images "
                              f"(extensions {', '.join(sorted(IMG_FORMATS))}) in {', '.join(map(str, entries))}")
        return [Path(name) for name in sorted(files)]


def read_data_yaml(path: str | Path) -> DataYaml:
    """Read a data.yaml (or a folder holding exactly one YAML file): root, names, split entries."""
    yaml_path = _find_yaml(Path(path)).absolute()
    data, lines = _load(yaml_path)

    def where(key: str) -> str:
        return f"{yaml_path}, line {lines[key]}" if key in lines else str(yaml_path)

    for key, types in _KEY_TYPES.items():
        if data.get(key) is not None and not isinstance(data[key], types):
            expected = " or ".join("a list" if t is list else "a mapping" if t is dict else "a string" for t in types)
            raise ConfigError(f"{where(key)}: '{key}:' must be {expected}, not {type(data[key]).__name__}")
    if "val" not in data and "validation" in data:  # Ultralytics renames it too
        data["val"] = data.pop("validation")
        if "validation" in lines:
            lines["val"] = lines["validation"]
    names = _class_names(data, where)
    root = _dataset_root(data.get("path"), yaml_path.parent)
    splits = {}
    for split in SPLITS:
        value = data.get(split)
        if value:
            splits[split] = _resolve_entries(value, root, where(split), split)
    return DataYaml(yaml_path, root, names, splits, lines)


def _find_yaml(path: Path) -> Path:
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
        if len(found) != 1:
            raise ConfigError(f"{path} holds {len(found)} YAML files, not one: name the dataset's data.yaml")
        return found[0]
    if not path.is_file():
        raise MissingInputError(f"dataset YAML not found: {path}")
    return path


def _load(path: Path) -> tuple[dict, dict[str, int]]:
    """The YAML's mapping and the line of each top-level key."""
    try:
        text = path.read_text(encoding="utf-8-sig")
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not UTF-8 text: {error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        place = f", line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{place}: not valid YAML ({getattr(error, 'problem', None) or error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping of keys (path, train, val, test, names), "
                          f"not {type(data).__name__}")
    lines = {str(key.value): key.start_mark.line + 1 for key, _ in root.value if isinstance(key, yaml.ScalarNode)}
    return data, lines


def _class_names(data: dict, where) -> list[str]:
    names, nc = data.get("names"), data.get("nc")
    if names is None and "nc" not in data:
        raise ConfigError(f"{where('names')}: the dataset needs 'names:' (a list, or a mapping index: name)")
    if "nc" in data:
        try:
            if float(nc) != int(float(nc)):
                raise ValueError
            nc = int(float(nc))
        except (TypeError, ValueError):
            raise ConfigError(f"{where('nc')}: 'nc: {nc}' must be an integer") from None
    if names is None:
        names = [f"class_{index}" for index in range(nc)]  # Ultralytics' names for an nc-only YAML
    if isinstance(names, dict):
        try:
            by_index = {int(key): str(value) for key, value in names.items()}
        except (TypeError, ValueError):
            raise ConfigError(f"{where('names')}: 'names:' keys must be class indices 0, 1, ...") from None
        if sorted(by_index) != list(range(len(by_index))):
            raise ConfigError(f"{where('names')}: 'names:' indices must be 0-{len(by_index) - 1}, "
                              f"found {sorted(by_index)[:10]}")
        names = [by_index[index] for index in range(len(by_index))]
    else:
        names = [str(name) for name in names]
    if not names:
        raise ConfigError(f"{where('names')}: 'names:' is empty; a dataset needs at least one class")
    if nc is not None and len(names) != nc:
        raise ConfigError(f"{where('nc')}: 'nc: {nc}' does not match the {len(names)} class names")
    counts = Counter(name.lower() for name in names)
    twins = sorted({name for name in names if counts[name.lower()] > 1})
    if twins:  # classes are matched to a model's by name
        raise ConfigError(f"{where('names')}: class names must be distinct (ignoring case), repeated: "
                          f"{twins[:10]}")
    return names


def _dataset_root(path_value: str | None, yaml_dir: Path) -> Path:
    if not path_value:
        return yaml_dir
    root = Path(path_value)
    if root.is_absolute():
        return root
    candidates = [yaml_dir / root, Path.cwd() / root]
    return next((candidate for candidate in candidates if candidate.exists()), candidates[0])


def _resolve_entries(value: str | list, root: Path, where: str, split: str) -> tuple[Path, ...]:
    if isinstance(value, str):
        resolved = (root / value).resolve()
        # Roboflow writes `../train/images` (relative to a folder below the YAML): Ultralytics then drops the `../`.
        if not resolved.exists() and value.startswith("../"):
            resolved = (root / value[3:]).resolve()
        return (resolved,)
    bad = [item for item in value if not isinstance(item, str) or not item]
    if bad:
        raise ConfigError(f"{where}: '{split}:' entries must be folder or list-file paths, found {bad[:3]}")
    return tuple((root / item).resolve() for item in value)  # a list gets no `../` fallback in Ultralytics either


def _listed_images(list_file: Path) -> list[str]:
    """The images an image-list file names: `./x` relative to the file, other relative lines relative to the
    current directory (as Ultralytics reads them)."""
    try:
        text = list_file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"{list_file} is not a UTF-8 list of image paths (a split entry is a folder or a "
                          f"text file with one image path a line)") from None
    parent = str(list_file.parent) + os.sep
    images = []
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.strip()
        if not entry:
            continue
        name = parent + entry[2:] if entry.startswith("./") else entry
        if not os.path.isabs(name):
            name = os.path.join(os.getcwd(), name)
        if not is_image_name(name):
            raise ConfigError(f"{list_file}, line {number}: {entry!r} is not an image "
                              f"(extensions {', '.join(sorted(IMG_FORMATS))})")
        if not os.path.isfile(name):
            relative = "" if entry.startswith(("./", "/")) else " (lines not starting with ./ are relative to " \
                                                              "the current directory, as Ultralytics reads them)"
            raise ConfigError(f"{list_file}, line {number}: image {name} not found{relative}")
        images.append(name)
    return images
