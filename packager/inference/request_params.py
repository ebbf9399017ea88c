"""The per-request parameters of a served ensemble, checked strictly (standard library only).

Both served Python models check a request's parameters with this: the preprocess first, so a request with an
unknown name or an unbounded value is refused before its image is decoded (microseconds, not the detector's
time), then the postprocess, which applies them. Copied flat next to both `model.py` files at render time.
"""

from __future__ import annotations

# name -> Thresholds field
ACCEPTED = {"conf_threshold": "conf", "iou_threshold": "iou", "max_det": "max_det", "multi_label": "multi_label"}
# NMS keeps at most max_det boxes, one candidate sweep each: the cap bounds the cost of one request.
MAX_DET_LIMIT = 1000
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


class ParameterError(ValueError):
    """A request parameter the served model does not accept (the client's fault)."""


def parse_parameters(values: dict) -> dict:
    """Request parameters -> Thresholds fields ({"conf": 0.5, ...}) for the names present; ParameterError if
    a name is unknown or a value has the wrong type or range. Values may arrive as numbers or strings."""
    unknown = sorted(set(values) - set(ACCEPTED))
    if unknown:
        raise ParameterError(
            f"unknown request parameter(s) {', '.join(unknown)}; accepted: {', '.join(ACCEPTED)}"
        )
    fields = {}
    if "conf_threshold" in values:
        fields["conf"] = _fraction(values, "conf_threshold")
    if "iou_threshold" in values:
        fields["iou"] = _fraction(values, "iou_threshold")
    if "max_det" in values:
        fields["max_det"] = _max_det(values["max_det"])
    if "multi_label" in values:
        fields["multi_label"] = _flag(values["multi_label"])
    return fields


def _number(key: str, value) -> float:
    if isinstance(value, bool):  # JSON true would otherwise read as 1
        raise ParameterError(f"{key} must be a number, got the boolean {value}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ParameterError(f"{key} must be a number, got {value!r}") from None
    if number != number:
        raise ParameterError(f"{key} must be a number, got NaN")
    return number


def _fraction(values: dict, key: str) -> float:
    number = _number(key, values[key])
    if not 0.0 <= number <= 1.0:
        raise ParameterError(f"{key} must be within [0, 1], got {number}")
    return number


def _max_det(value) -> int:
    number = _number("max_det", value)
    if not number.is_integer() or not 1 <= number <= MAX_DET_LIMIT:
        raise ParameterError(f"max_det must be an integer from 1 to {MAX_DET_LIMIT}, got {value!r}")
    return int(number)


def _flag(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if isinstance(value, (int, float, str)) and text in _TRUE | _FALSE:
        return text in _TRUE
    raise ParameterError(f"multi_label must be true or false (or 1/0), got {value!r}")


def compiled_nms_profile(thresholds, nms: dict) -> int:
    """Index of the in-graph NMS profile serving `thresholds` (a postprocess.Thresholds), or ParameterError.

    `nms` is the detector's compiled-in NMS (export/nms_graph.NmsSpec.to_dict()): the IoU threshold and
    multi_label are fixed in the engine per profile, conf_threshold may not go below its floor (the NMS dropped
    those boxes) and max_det not above its rows; within those, a request is served exactly (docs/gpu-prepost.md).
    """
    profiles = [(float(p["iou"]), bool(p["multi_label"])) for p in nms["profiles"]]
    for index, (iou, multi_label) in enumerate(profiles):
        if abs(thresholds.iou - iou) < 1e-6 and thresholds.multi_label == multi_label:
            break
    else:
        served = ", ".join(f"iou_threshold {iou:g} with multi_label {str(ml).lower()}" for iou, ml in profiles)
        raise ParameterError(
            f"iou_threshold {thresholds.iou:g} with multi_label {str(thresholds.multi_label).lower()} is not "
            f"compiled into this detector's NMS; it serves {served} (render with --nms python for any value)")
    if thresholds.conf < float(nms["conf_floor"]):
        raise ParameterError(f"conf_threshold {thresholds.conf:g} is below this detector's in-graph NMS floor "
                             f"{float(nms['conf_floor']):g}")
    if thresholds.max_det > int(nms["rows"]):
        raise ParameterError(f"max_det {thresholds.max_det} is above the {int(nms['rows'])} rows of this detector's "
                             "in-graph NMS")
    return index
