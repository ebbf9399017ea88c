"""Served postprocess: raw head output + letterbox_info -> DETECTIONS (n, 6) in original image pixels.

Rendered into `<model>_postprocess/1/` next to flat copies of yqpack's own `postprocess.py` and `letterbox.py`:
the same decode + class-aware NMS (raw head) or end-to-end selection (NMS-free head, config parameter
yqpack_head_format) as local evaluation. Thresholds default to this model's config parameters and can be overridden
per request with the request parameters conf_threshold, iou_threshold, max_det and multi_label (for an
end2end head only conf_threshold and max_det apply). A request with a batch of b images gets DETECTIONS (b, max_n, 6), short rows padded with
score 0 and class_id -1 (one image per request, the documented use, never pads).
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from letterbox import LetterboxInfo  # noqa: E402  (copied next to this file)
from postprocess import Thresholds, postprocess  # noqa: E402

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.raw_name = config["input"][0]["name"]
        self.defaults = _thresholds(params, Thresholds())
        self.head_format = params.get("yqpack_head_format", "raw")  # rendered from the build's ModelSpec.head

    def execute(self, requests):
        return [self._one(request) for request in requests]

    def _one(self, request):
        try:
            thresholds = _thresholds(json.loads(request.parameters() or "{}"), self.defaults)
            raw = pb_utils.get_input_tensor_by_name(request, self.raw_name).as_numpy()
            infos = pb_utils.get_input_tensor_by_name(request, "letterbox_info").as_numpy()
            per_image = [
                postprocess(raw[index], LetterboxInfo.from_array(infos[index]), thresholds, self.head_format)
                for index in range(len(raw))
            ]
        except Exception as error:  # noqa: BLE001  (any failure is this request's error, not the server's)
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"postprocess: {error}"))
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("DETECTIONS", _stack(per_image))])


def _stack(per_image):
    if len(per_image) == 1:
        return per_image[0][None]
    rows = max(len(dets) for dets in per_image)
    out = np.zeros((len(per_image), rows, 6), dtype=np.float32)
    out[:, :, 5] = -1
    for index, dets in enumerate(per_image):
        out[index, : len(dets)] = dets
    return out


def _thresholds(values, defaults):
    """Read conf_threshold / iou_threshold / max_det / multi_label; reject nonsense with a plain message."""
    conf = _number(values, "conf_threshold", defaults.conf, float)
    iou = _number(values, "iou_threshold", defaults.iou, float)
    max_det = _number(values, "max_det", defaults.max_det, int)
    multi_label = values.get("multi_label", defaults.multi_label)
    if isinstance(multi_label, str):
        if multi_label.strip().lower() not in _TRUE | _FALSE:
            raise ValueError(f"multi_label must be true or false, got {multi_label!r}")
        multi_label = multi_label.strip().lower() in _TRUE
    if not 0.0 <= conf <= 1.0:
        raise ValueError(f"conf_threshold must be within [0, 1], got {conf}")
    if not 0.0 <= iou <= 1.0:
        raise ValueError(f"iou_threshold must be within [0, 1], got {iou}")
    if max_det < 1:
        raise ValueError(f"max_det must be a positive integer, got {max_det}")
    return Thresholds(conf=conf, iou=iou, max_det=max_det, multi_label=bool(multi_label))


def _number(values, key, default, kind):
    if key not in values:
        return default
    value = values[key]
    try:
        number = float(value)  # request parameters may arrive as int, float or string
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a number, got {value!r}") from None
    if kind is int:
        if not number.is_integer():
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return int(number)
    return number
