"""The "Labels" section of the verify report: what served mAP was scored against, and which of the model's
classes the labels lack (left out of scoring: a 2-class dataset scores a COCO model on those 2 classes only)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from packager.verify.result import VerifyResult


def labels_section(result: "VerifyResult") -> list[str]:
    labels = result.labels
    if not labels:
        return []
    classes = labels.get("classes") or []
    shown = ", ".join(classes[:20]) + (" ..." if len(classes) > 20 else "")
    lines = ["## Labels", "", f"- {labels.get('description')}",
             f"- classes scored: {len(classes)} ({shown}), matched to each model's class names by name (their "
             "order does not matter)"]
    by_names: dict[tuple[str, ...], list[str]] = {}
    for model, names in (labels.get("unscored") or {}).items():
        by_names.setdefault(tuple(names), []).append(model)
    for names, models in by_names.items():
        if names:
            lines.append(f"- **not scored: {len(names)} classes of {', '.join(models)}** that the labels lack "
                         f"(their detections are left out of mAP and of the annotation check): {', '.join(names)}")
    for check in result.annotation_checks:
        if check.unjudged_detections:
            lines.append(f"- annotation check ({check.model}): {check.unjudged_detections} confident detections of "
                         "classes the labels lack were not judged")
    return lines + [""]
