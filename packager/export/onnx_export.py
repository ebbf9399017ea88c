"""Export a YOLO detector to ONNX with Ultralytics: dynamic batch, fixed HxW, no embedded NMS.

Ultralytics' `export(dynamic=True)` makes batch, height and width dynamic, which leaves Shape/Range anchor
arithmetic in the graph. We export that, then pin H and W to `imgsz` and let onnxslim fold the arithmetic away,
so only the batch stays dynamic (what Triton's dynamic batcher and TensorRT profiles want).

Two head formats come out of Ultralytics, told apart from the exported graph and its metadata (never the name):
`raw` (YOLOv8, YOLO11, YOLO26 with --no-end2end): (batch, 4 + nc, anchors) boxes cx, cy, w, h + class scores,
which need NMS; `end2end` (YOLO26's one-to-one head, also YOLOv10): (batch, k, 6) rows x1, y1, x2, y2, score,
class already selected by an in-graph top-k, no NMS.
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

from packager.core.paths import ultralytics_offline_env
from packager.core.contracts import ConfigError, HeadFormat, MissingInputError

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
    head_format: HeadFormat = HeadFormat.RAW  # detected from the graph + metadata (detect_head_format)
    stride: int = STRIDE  # the model's largest stride


DEFAULT_IMGSZ = (640, 640)


def model_imgsz(model: str | Path) -> tuple[int, int]:
    """The input size a model was trained at, what a user serves it at unless told otherwise: an Ultralytics .pt
    records its training `imgsz` (train_args); a model .yaml or a checkpoint without it gets 640."""
    path = Path(model)
    if path.suffix.lower() != ".pt" or not path.is_file():
        return DEFAULT_IMGSZ
    import torch

    ultralytics_offline_env()  # unpickling imports Ultralytics' classes
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    trained = (checkpoint.get("train_args") or {}).get("imgsz") if isinstance(checkpoint, dict) else None
    try:
        return parse_imgsz(trained) if trained else DEFAULT_IMGSZ
    except ConfigError:  # an odd recorded size (e.g. not a multiple of 32): the usual default
        return DEFAULT_IMGSZ


def parse_imgsz(value) -> tuple[int, int]:
    """'640', 640, '640,480', (640, 480) -> (h, w); each a positive multiple of the stride 32."""
    if isinstance(value, str):
        parts = [p for p in value.replace("x", ",").split(",") if p.strip()]
        try:
            sizes = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(f"--imgsz must be an integer or H,W (e.g. 640 or 640,480), got {value!r}") from None
    elif isinstance(value, int):
        sizes = [value]
    else:
        sizes = [int(v) for v in value]
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or any(s < STRIDE or s % STRIDE for s in sizes):
        raise ConfigError(f"--imgsz must be one or two positive multiples of {STRIDE} (e.g. 640), got {value!r}")
    return sizes[0], sizes[1]


def check_model_path(model: str | Path) -> Path:
    path = Path(model)
    if path.suffix.lower() not in MODEL_SUFFIXES:
        raise ConfigError(f"--model must be a .pt checkpoint, a model .yaml or an .onnx file, got {path.name}")
    # Ultralytics resolves bare model YAML names (yolo11n.yaml) from its own package: no file needed.
    if path.suffix.lower() in (".yaml", ".yml") and not path.exists() and path.parent == Path("."):
        return path
    if not path.is_file():
        raise MissingInputError(f"model file not found: {path}")
    return path


def export_onnx(
    model: str | Path,
    out_path: str | Path,
    imgsz: tuple[int, int] = (640, 640),
    dynamic_batch: bool = True,
    opset: int = DEFAULT_OPSET,
    batchnorm_images: np.ndarray | None = None,
    end2end: bool | None = None,
) -> ExportResult:
    """Export `model` (.pt, Ultralytics .yaml or existing .onnx) to `out_path` (ONNX, fixed HxW).

    `batchnorm_images` (N, 3, H, W) re-estimates BatchNorm statistics before export; use it for randomly
    initialised .yaml models, whose untouched statistics make activations vanish and calibration meaningless.
    `end2end`: None exports the NMS-free one-to-one head when the model has one (YOLO26) and the classic head
    otherwise; True requires it; False exports the classic one-to-many head. An existing .onnx is taken as is.
    """
    model_path = check_model_path(model)
    imgsz = parse_imgsz(imgsz)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if model_path.suffix.lower() == ".onnx":
        return _adopt_onnx(model_path, out_path, imgsz)
    return _export_ultralytics(model_path, out_path, imgsz, dynamic_batch, opset, batchnorm_images, end2end)


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


def _export_ultralytics(model_path, out_path, imgsz, dynamic_batch, opset, batchnorm_images, end2end) -> ExportResult:
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
            one_to_one = _wants_one_to_one_head(yolo.model, model_path, end2end)
            if batchnorm_images is not None:
                reestimate_batchnorm(yolo.model, batchnorm_images)
            # Ultralytics 8.4: nms=False exports the NMS-free one-to-one head, nms=None the one-to-many head.
            exported = yolo.export(
                format="onnx", imgsz=list(imgsz), dynamic=dynamic_batch, opset=opset, simplify=True, batch=1,
                device="cpu", nms=False if one_to_one else None,
            )
            exported = Path(exported).resolve() if exported else None  # may be relative to the temp cwd
        if exported is None or not exported.is_file():
            raise ConfigError(f"Ultralytics did not export {model_path.name} to ONNX")
        class_names = [str(yolo.names[i]) for i in sorted(yolo.names)]
        stride = int(max(yolo.model.stride))
        _finalize_onnx(exported, out_path, imgsz, dynamic_batch)
    return _describe(out_path, model_path, class_names, imgsz, stride)


def _wants_one_to_one_head(torch_model, model_path: Path, end2end: bool | None) -> bool:
    """Whether to export the one-to-one (NMS-free) head: asked for and present (YOLO26, YOLOv10)."""
    head = torch_model.model[-1]
    has_one_to_one = getattr(head, "one2one_cv2", None) is not None
    if end2end and not has_one_to_one:
        raise ConfigError(
            f"{model_path.name} has no NMS-free (one-to-one) detection head: build it without --end2end"
        )
    return has_one_to_one and end2end is not False


def _adopt_onnx(model_path: Path, out_path: Path, imgsz) -> ExportResult:
    """An existing ONNX export: check it is a YOLO detector of the right size, then copy it."""
    import onnx

    model = onnx.load(str(model_path))
    metadata = {p.key: p.value for p in model.metadata_props}
    input_dims = _dims(model.graph.input[0])
    if len(model.graph.input) != 1 or len(input_dims) != 4:
        raise ConfigError(f"{model_path.name} is not a single-input NCHW detector")
    if all(isinstance(d, int) for d in input_dims[2:]) and tuple(input_dims[2:]) != tuple(imgsz):
        raise ConfigError(
            f"{model_path.name} takes {input_dims[2]}x{input_dims[3]} images but --imgsz is {imgsz[0]}x{imgsz[1]}"
        )
    try:
        names = ast.literal_eval(metadata.get("names", "{}"))
    except (ValueError, SyntaxError):
        names = {}
    output_dims = _dims(model.graph.output[0])
    if detect_head_format(model, output_dims, metadata) is HeadFormat.END2END:
        if not names:
            raise ConfigError(f"{model_path.name} is an end-to-end export without class names in its metadata")
        num_classes = max(names) + 1
    else:
        num_classes = output_dims[1] - 4 if isinstance(output_dims[1], int) else len(names)
    class_names = [str(names.get(i, f"class{i}")) for i in range(num_classes)]
    dynamic = not isinstance(input_dims[0], int)
    stride = int(metadata.get("stride", STRIDE)) if str(metadata.get("stride", "")).isdigit() else STRIDE
    _finalize_onnx(model_path, out_path, imgsz, dynamic)
    return _describe(out_path, model_path, class_names, imgsz, stride)


def detect_head_format(onnx_model, output_dims: list, metadata: dict[str, str]) -> HeadFormat:
    """`end2end` when the graph selects (k, 6) rows with an in-graph TopK, else `raw`; checked against metadata.

    Ultralytics writes `end2end: 'True'` into the ONNX metadata of NMS-free exports; a foreign export without
    metadata is judged by its graph alone.
    """
    has_topk = any(node.op_type == "TopK" for node in onnx_model.graph.node)
    selects_rows = len(output_dims) == 3 and output_dims[2] == 6 and has_topk
    declared = str(metadata.get("end2end", "")).strip().lower()
    if declared == "true" and not selects_rows:
        raise ConfigError(
            f"the ONNX metadata says end2end but output {onnx_model.graph.output[0].name} has shape {output_dims}, "
            "not (batch, k, 6) from a TopK"
        )
    return HeadFormat.END2END if selects_rows else HeadFormat.RAW


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
        if len(dims) > 2 and not dims[2].HasField("dim_value"):
            dims[2].dim_param = "anchors"  # re-inferred from the pinned input size below (raw heads only)
    del model.graph.value_info[:]
    model = onnxslim.slim(model)
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))


def _describe(onnx_path: Path, source: Path, class_names: list[str], imgsz, stride: int) -> ExportResult:
    """Read names/shapes/head format back from the final graph and check it runs (batch 2 if dynamic)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    inp, out = model.graph.input[0], model.graph.output[0]
    input_shape = [d if isinstance(d, int) else -1 for d in _dims(inp)]
    dynamic = input_shape[0] == -1
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    batch = 2 if dynamic else input_shape[0]
    result = session.run(None, {inp.name: np.zeros((batch, 3, *imgsz), dtype=np.float32)})[0]
    metadata = {p.key: p.value for p in model.metadata_props}
    head_format = detect_head_format(model, list(result.shape), metadata)
    end2end = head_format is HeadFormat.END2END
    expected = 6 if end2end else 4 + len(class_names)
    if result.ndim != 3 or result.shape[2 if end2end else 1] != expected:
        layout = "(batch, k, 6)" if end2end else f"(batch, 4 + {len(class_names)} classes, anchors)"
        raise ConfigError(
            f"{source.name} does not look like a YOLO detection head: output {out.name} has shape "
            f"{result.shape}, expected {layout}"
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
        head_format=head_format,
        stride=int(stride),
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
