"""`yqpack build --data PATH/data.yaml [--split val|test]`: the dataset YAML checked against the build's other data
options and read once.

What goes with --data: `--calib-images` / `--calib-data` (they then calibrate instead of the YAML's train split:
unlabelled images from the deployment, say) and `--tune-images` (preset auto's tuning images instead of the other
train images). What does not: `--val-images` / `--val-annotations`, a second ground truth for the one gate.
"""

from __future__ import annotations

from packager.core.contracts import ConfigError
from packager.datasets.data_yaml import DataYaml, read_data_yaml
from packager.evaluate.ground_truth import EVAL_SPLITS
from packager.pipeline.result import BuildOptions


def dataset_inputs(options: BuildOptions) -> DataYaml | None:
    """The dataset YAML of `options.data` (None without one), after checking the options that go with it."""
    if options.split not in EVAL_SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(EVAL_SPLITS)}, got {options.split!r}")
    if options.data is None:
        if options.split != "val":
            raise ConfigError(f"--split {options.split} names a split of --data: pass --data PATH/data.yaml too")
        return None
    if options.val_images is not None or options.val_annotations is not None:
        raise ConfigError("--data evaluates the build on its --split, --val-images/--val-annotations on a COCO "
                          "JSON: give one of the two (--calib-images or --calib-data may go with --data, and then "
                          "calibrate instead of its train split)")
    return read_data_yaml(options.data)
