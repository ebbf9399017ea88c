"""Statistics of intermediate tensors over calibration images, streamed batch by batch through onnxruntime.

One pass of a model with extra graph outputs; nothing is kept but the running reductions (per-channel sums,
histograms), so memory does not grow with the number of images.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

BATCH = 4  # images per onnxruntime run: a few hundred MB of intermediate tensors for yolov8n at 640


def with_outputs(model, names: Iterable[str]):
    """A copy of `model` whose graph outputs are `names` (float tensors) and nothing else."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.output[:]
    out.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    return out


def stream(model, names: list[str], images: np.ndarray, batch: int = BATCH) -> Iterator[dict[str, np.ndarray]]:
    """{tensor name: value} for each batch of `images` (N, 3, H, W) run through `model` (onnxruntime CPU)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(with_outputs(model, names).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    image_input = model.graph.input[0].name
    for start in range(0, len(images), batch):
        values = session.run(names, {image_input: images[start:start + batch]})
        yield dict(zip(names, values))
