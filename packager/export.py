"""Export a YOLO detector to ONNX with Ultralytics: dynamic batch, fixed HxW, no embedded NMS.

Ultralytics' `export(dynamic=True)` makes batch, height and width dynamic, which leaves Shape/Range anchor
arithmetic in the graph. We export that, then pin H and W to `imgsz` and let onnxslim fold the arithmetic away,
so only the batch stays dynamic (what Triton's dynamic batcher and TensorRT profiles want).
"""

from __future__ import annotations

import ast
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .assets import ultralytics_offline_env
from .contracts import HeadFormat

STRIDE = 32
DEFAULT_OPSET = 17
MODEL_SUFFIXES = (".pt", ".yaml", ".yml", ".onnx")


@dataclass
class ExportResult:
    onnx_path: Path
    model_name: str
    source_model: str
    imgsz: tuple[int, int]
    class_names: list[str]
    input_name: str
    input_shape: list[int]  # -1 for the dynamic batch
    output_name: str
    output_shape: list[int]
    dynamic_batch: bool
    opset: int
    head_format: HeadFormat = HeadFormat.RAW
    stride: int = 32


def parse_imgsz(value) -> tuple[int, int]:
    """'640', 640, '640,480', (640, 480) -> (h, w); each a positive multiple of the stride 32."""
    if isinstance(value, str):
        parts = [p for p in value.replace("x", ",").split(",") if p.strip()]
        try:
            sizes = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"--imgsz must be an integer or H,W (e.g. 640 or 640,480), got {value!r}") from None
    elif isinstance(value, int):
        sizes = [value]
    else:
        sizes = [int(v) for v in value]
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or any(s < STRIDE or s % STRIDE for s in sizes):
        raise ValueError(f"--imgsz must be one or two positive multiples of {STRIDE} (e.g. 640), got {value!r}")
    return sizes[0], sizes[1]


def check_model_path(model: str | Path) -> Path:
    path = Path(model)
    if path.suffix.lower() not in MODEL_SUFFIXES:
        raise ValueError(f"--model must be a .pt checkpoint, a model .yaml or an .onnx file, got {path.name}")
    # Ultralytics resolves bare model YAML names (yolo11n.yaml) from its own package: no file needed.
    if path.suffix.lower() in (".yaml", ".yml") and not path.exists() and path.parent == Path("."):
        return path
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    return path


def export_onnx(
    model: str | Path,
    out_path: str | Path,
    imgsz: tuple[int, int] = (640, 640),
    dynamic_batch: bool = True,
    opset: int = DEFAULT_OPSET,
    batchnorm_images: np.ndarray | None = None,
) -> ExportResult:
    """Export `model` (.pt, Ultralytics .yaml or existing .onnx) to `out_path` (ONNX, fixed HxW).

    `batchnorm_images` (N, 3, H, W) re-estimates BatchNorm statistics before export; use it for randomly
    initialised .yaml models, whose untouched statistics make activations vanish and calibration meaningless.
    """
    model_path = check_model_path(model)
    imgsz = parse_imgsz(imgsz)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if model_path.suffix.lower() == ".onnx":
        return _adopt_onnx(model_path, out_path, imgsz)
    return _export_ultralytics(model_path, out_path, imgsz, dynamic_batch, opset, batchnorm_images)


def reestimate_batchnorm(torch_model, images: np.ndarray, batch_size: int = 4) -> None:
    """Replace BatchNorm running statistics with a cumulative average over `images` (no weights change)."""
    import torch

    norms = [m for m in torch_model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # None = cumulative moving average over all batches seen
    torch_model.eval()
    for norm in norms:
        norm.train()
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            torch_model(torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])))
    torch_model.eval()


def _export_ultralytics(model_path, out_path, imgsz, dynamic_batch, opset, batchnorm_images) -> ExportResult:
    ultralytics_offline_env()
    from ultralytics import YOLO

    with tempfile.TemporaryDirectory(prefix="yqpack-export-") as tmp:
        # Ultralytics writes the .onnx beside the weights (or in the cwd for a .yaml): keep both in a temp dir.
        source = model_path
        if model_path.suffix == ".pt":
            source = Path(tmp) / model_path.name
            shutil.copyfile(model_path, source)
        with _working_dir(tmp):
            yolo = YOLO(str(source), task="detect")
            if batchnorm_images is not None:
                reestimate_batchnorm(yolo.model, batchnorm_images)
            exported = yolo.export(
                format="onnx", imgsz=list(imgsz), dynamic=dynamic_batch, opset=opset, simplify=True, batch=1,
                device="cpu", nms=False,
            )
            exported = Path(exported).resolve() if exported else None  # may be relative to the temp cwd
        if exported is None or not exported.is_file():
            raise RuntimeError(f"Ultralytics did not export {model_path.name} to ONNX")
        class_names = [str(yolo.names[i]) for i in sorted(yolo.names)]
        _finalize_onnx(exported, out_path, imgsz, dynamic_batch)
    return _describe(out_path, model_path, class_names, imgsz)


def _adopt_onnx(model_path: Path, out_path: Path, imgsz) -> ExportResult:
    """An existing ONNX export: check it is a YOLO detector of the right size, then copy it."""
    import onnx

    model = onnx.load(str(model_path))
    metadata = {p.key: p.value for p in model.metadata_props}
    input_dims = _dims(model.graph.input[0])
    if len(model.graph.input) != 1 or len(input_dims) != 4:
        raise ValueError(f"{model_path.name} is not a single-input NCHW detector")
    if all(isinstance(d, int) for d in input_dims[2:]) and tuple(input_dims[2:]) != tuple(imgsz):
        raise ValueError(
            f"{model_path.name} takes {input_dims[2]}x{input_dims[3]} images but --imgsz is {imgsz[0]}x{imgsz[1]}"
        )
    try:
        names = ast.literal_eval(metadata.get("names", "{}"))
    except (ValueError, SyntaxError):
        names = {}
    output_dims = _dims(model.graph.output[0])
    num_classes = output_dims[1] - 4 if isinstance(output_dims[1], int) else len(names)
    class_names = [str(names.get(i, f"class{i}")) for i in range(num_classes)]
    dynamic = not isinstance(input_dims[0], int)
    _finalize_onnx(model_path, out_path, imgsz, dynamic)
    return _describe(out_path, model_path, class_names, imgsz)


def _finalize_onnx(exported: Path, out_path: Path, imgsz, dynamic_batch: bool) -> None:
    """Pin H/W to `imgsz`, keep batch dynamic (or as exported), fold shape arithmetic, write `out_path`."""
    import onnx
    import onnxslim

    model = onnx.load(str(exported))
    input_dims = model.graph.input[0].type.tensor_type.shape.dim
    input_dims[2].dim_value, input_dims[3].dim_value = imgsz
    if dynamic_batch:
        input_dims[0].dim_param = "batch"
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim
        if dynamic_batch:
            dims[0].dim_param = "batch"
        if len(dims) > 2:
            dims[2].dim_param = "anchors"  # re-inferred from the pinned input size below
    del model.graph.value_info[:]
    model = onnxslim.slim(model)
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))


def _describe(onnx_path: Path, source: Path, class_names: list[str], imgsz) -> ExportResult:
    """Read names/shapes back from the final graph and check it runs (with batch 2 if the batch is dynamic)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    inp, out = model.graph.input[0], model.graph.output[0]
    input_shape = [d if isinstance(d, int) else -1 for d in _dims(inp)]
    dynamic = input_shape[0] == -1
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    batch = 2 if dynamic else input_shape[0]
    result = session.run(None, {inp.name: np.zeros((batch, 3, *imgsz), dtype=np.float32)})[0]
    if result.ndim != 3 or result.shape[1] != 4 + len(class_names):
        raise ValueError(
            f"{source.name} does not look like a YOLO detection head: output {out.name} has shape "
            f"{result.shape}, expected (batch, 4 + {len(class_names)} classes, anchors)"
        )
    output_shape = [-1 if dynamic else batch, int(result.shape[1]), int(result.shape[2])]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return ExportResult(
        onnx_path=onnx_path,
        model_name=source.stem,
        source_model=str(source.resolve()) if source.exists() else source.name,
        imgsz=tuple(imgsz),
        class_names=class_names,
        input_name=inp.name,
        input_shape=input_shape,
        output_name=out.name,
        output_shape=output_shape,
        dynamic_batch=dynamic,
        opset=int(opset),
    )


def _dims(value_info) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in value_info.type.tensor_type.shape.dim]


@contextmanager
def _working_dir(path):
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)
