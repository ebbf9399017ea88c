"""yqpack's letterbox as a DALI pipeline: the `gpu` target's preprocess (nvJPEG decode, resize and pad on the GPU).

The same geometry as `letterbox.py` (Ultralytics' LetterBox(auto=False, center=True)): scale = min(H / h, W / w),
each side rounded half to even as Python's round() and never below 1 pixel, resized with linear interpolation and
no antialiasing (cv2.INTER_LINEAR), padded with grey 114 (top/left = floor of half the padding, the odd pixel at
the bottom/right), RGB planes (3, H, W) FP32 = pixel * float32(1/255), and `letterbox_info` [5] = scale, pad_x,
pad_y, orig_h, orig_w as the Python preprocess emits. The geometry is computed from the decoded image's own shape
(float64 on the CPU), so EXIF-rotated images are measured after rotation, as cv2.imdecode does.

Pixels differ from OpenCV's by at most a few levels (OpenCV resizes in 11-bit fixed point, DALI in float; nvJPEG's
IDCT and chroma upsampling differ from libjpeg-turbo's): measured in docs/gpu-prepost.md and tests/test_dali.py.

`device="gpu"` is what Triton's dali backend serves (decoder on the "mixed" device = nvJPEG); `device="cpu"` runs
the same operators on the CPU: tests, calibration and the benchmark use it on machines without a GPU.
Imports only numpy and nvidia.dali (pinned in pyproject.toml); nothing else of yqpack.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PAD_VALUE = 114
INPUT_NAME = "encoded"  # the pipeline's external source = the DALI model's Triton input (UINT8 [-1])
OUTPUT_NAMES = ("images", "letterbox_info")
_INV_255 = np.float32(1.0 / 255.0)


def _round_half_even(math, x):
    """Python's round() on a float64 DataNode: ties go to the even neighbour."""
    low = math.floor(x)
    fraction = x - low
    low_is_odd = (low - 2.0 * math.floor(low / 2.0)) == 1.0
    return low + (fraction > 0.5) + ((fraction == 0.5) & low_is_odd)


def letterbox_graph(height: int, width: int, device: str = "cpu", input_name: str = INPUT_NAME):
    """The pipeline's operators (call inside a pipeline definition): (images (3, H, W) FP32, letterbox_info)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import math

    encoded = fn.external_source(name=input_name, device="cpu", dtype=types.UINT8, ndim=1, no_copy=False)
    image = fn.decoders.image(encoded, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)
    shape = fn.cast(image.shape(), dtype=types.FLOAT64)  # (h, w, 3) on the CPU, also for GPU images
    orig_h, orig_w = shape[0], shape[1]
    scale = math.min(float(height) / orig_h, float(width) / orig_w)
    resized_w = math.max(_round_half_even(math, orig_w * scale), 1.0)
    resized_h = math.max(_round_half_even(math, orig_h * scale), 1.0)
    resized = fn.resize(image, resize_x=fn.cast(resized_w, dtype=types.FLOAT),
                        resize_y=fn.cast(resized_h, dtype=types.FLOAT), interp_type=types.INTERP_LINEAR,
                        antialias=False, dtype=types.UINT8)
    # letterbox.py's round(pad -+ 0.1): the padding is a whole or half pixel, so top/left = floor(pad / 2).
    top = math.floor((float(height) - resized_h) / 2.0)
    left = math.floor((float(width) - resized_w) / 2.0)
    anchor = fn.cast(fn.stack(-top, -left), dtype=types.INT32)
    padded = fn.slice(resized, anchor, np.array([height, width], dtype=np.int32), axes=[0, 1],
                      out_of_bounds_policy="pad", fill_values=PAD_VALUE)
    planes = fn.transpose(padded, perm=[2, 0, 1])
    images = fn.cast(planes, dtype=types.FLOAT) * _INV_255  # the same float32 product as letterbox.normalize_into
    info = fn.cast(fn.stack(scale, left, top, orig_h, orig_w), dtype=types.FLOAT)
    return images, info


def letterbox_pipeline(height: int, width: int, *, device: str = "cpu", batch_size: int = 8, num_threads: int = 1,
                       device_id: int | None | str = "auto", **pipeline_options):
    """A DALI Pipeline running `letterbox_graph`. CPU pipelines default to a synchronous executor (feed, run).
    `device_id` "auto": None on the CPU, GPU 0 for a GPU pipeline (None there only to serialize without CUDA)."""
    from nvidia.dali import pipeline_def

    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be cpu or gpu, got {device!r}")
    if device == "cpu":
        pipeline_options = {"exec_async": False, "exec_pipelined": False, **pipeline_options}
    if device_id == "auto":
        device_id = 0 if device == "gpu" else None

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, **pipeline_options)
    def yqpack_letterbox():
        return letterbox_graph(height, width, device)

    return yqpack_letterbox()


def serialize_pipeline(path: Path, height: int, width: int, *, device: str = "gpu", max_batch: int = 8,
                       num_threads: int = 4) -> Path:
    """Write the serialized pipeline (Triton's `model.dali`). Built without a device (serializing needs no GPU):
    Triton's dali backend deserializes it with the instance's own device id, batch size and thread count."""
    pipeline = letterbox_pipeline(height, width, device=device, batch_size=max_batch, num_threads=num_threads,
                                  device_id=None)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pipeline.serialize(filename=str(path))
    return path


class DaliLetterbox:
    """The CPU pipeline in-process: encoded images -> (images (n, 3, H, W) FP32, letterbox_info (n, 5)).

    What calibration, local evaluation and the benchmark use to see what the served DALI model emits. A batch
    with an image DALI cannot decode raises (DALI fails the whole batch, as Triton's dali backend does).
    """

    def __init__(self, height: int, width: int, batch_size: int = 8, num_threads: int = 1):
        self.size = (int(height), int(width))
        self.batch_size = int(batch_size)
        self.pipeline = letterbox_pipeline(height, width, device="cpu", batch_size=batch_size,
                                           num_threads=num_threads)
        self.pipeline.build()

    def __call__(self, encoded: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        images = np.empty((len(encoded), 3, *self.size), dtype=np.float32)
        infos = np.empty((len(encoded), 5), dtype=np.float32)
        for start in range(0, len(encoded), self.batch_size):
            chunk = [np.frombuffer(bytes(data), dtype=np.uint8) for data in encoded[start:start + self.batch_size]]
            self.pipeline.feed_input(INPUT_NAME, chunk)
            out_images, out_infos = self.pipeline.run()
            for offset in range(len(chunk)):
                images[start + offset] = np.asarray(out_images[offset])
                infos[start + offset] = np.asarray(out_infos[offset])
        return images, infos
