"""The gpu target's steps around the detector (docs/gpu-prepost.md): which pre/postprocess a render chooses, the
DALI preprocess model and the gate in front of it, and the ensemble's step list (also today's three steps)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from packager.core.contracts import ConfigError, MissingInputError, TensorSpec

# Where the host CPU's work moves off it (docs/gpu-prepost.md): the DALI preprocess (nvJPEG) behind a Python gate
# that only checks, and the NMS compiled into the TensorRT graph. Per target: allowed choices, the first the default.
PREPROCESS_CHOICES = {"gpu": ("dali", "python")}
NMS_CHOICES = {"gpu": ("graph", "python")}
# The DALI pipeline's CPU threads (header parsing, the host side of nvJPEG, argument arithmetic).
DALI_THREADS = 4
# The gate's output, the DALI preprocess's input: the encoded bytes as UINT8 (the dali backend takes no BYTES).
ENCODED_TENSOR = TensorSpec("encoded", (-1, -1), "uint8")


def choose(option: str, value: str | None, choices: dict[str, tuple[str, ...]], target: str) -> str:
    """The value of a --preprocess / --nms option on a target: its first choice when not given."""
    allowed = choices.get(target, ("python",))
    if value is None:
        return allowed[0]
    if value not in allowed:
        raise ConfigError(f"--{option} {value} is not served on the {target} target: choose {', '.join(allowed)}")
    return value


def gate_name(model_name: str) -> str:
    return f"{model_name}_gate"


def write_dali_model(model_dir: Path, height: int, width: int, max_batch: int, context: dict,
                     render: Callable[[str, dict, Path], None]) -> None:
    """The DALI preprocess: its config and 1/model.dali, the GPU pipeline serialized here (no GPU needed)."""
    try:
        import nvidia.dali
    except ImportError:
        raise MissingInputError("--preprocess dali needs NVIDIA DALI in yqpack's environment (pyproject.toml pins "
                                "nvidia-dali-cuda130): reinstall with scripts/install.sh, or render with "
                                "--preprocess python") from None
    from packager.inference.dali_letterbox import serialize_pipeline

    (model_dir / "1").mkdir(parents=True)
    serialize_pipeline(model_dir / "1" / "model.dali", height, width, device="gpu", max_batch=max_batch,
                       num_threads=DALI_THREADS)
    render("preprocess-dali/config.pbtxt.j2",
           {**context, "dali_threads": DALI_THREADS, "dali_version": nvidia.dali.__version__}, model_dir / "config.pbtxt")


def ensemble_steps(model_name: str, preprocess: str, letterboxed: str, output: str, detector: str) -> list[dict]:
    """The ensemble's steps, each {model_name, input_map, output_map} (model tensor -> ensemble tensor)."""
    steps = []
    if preprocess == "dali":
        steps.append({"model_name": gate_name(model_name), "input_map": [("IMAGE", "IMAGE")],
                      "output_map": [("encoded", "encoded")]})
        pre_input = [("encoded", "encoded")]
    else:
        pre_input = [("IMAGE", "IMAGE")]
    return steps + [
        {"model_name": f"{model_name}_preprocess", "input_map": pre_input,
         "output_map": [("images", "letterboxed"), ("letterbox_info", "letterbox_info")]},
        {"model_name": detector, "input_map": [(letterboxed, "letterboxed")],
         "output_map": [(output, "raw_output")]},
        {"model_name": f"{model_name}_postprocess",
         "input_map": [(output, "raw_output"), ("letterbox_info", "letterbox_info")],
         "output_map": [("DETECTIONS", "DETECTIONS")]},
    ]
