"""Preset auto: after `quantize_int8_twins` calibrated ModelOpt's default placement, keep the fewest, most
sensitive units precise until a label-free agreement target is met on tuning images (packager/quantize/sensitivity.py)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from packager.core.contracts import ConfigError
from packager.quantize.int8 import (
    AutoSelection,
    QuantizeOptions,
    QuantizeResult,
    node_order,
    quantized_node_names,
    write_int8_twins,
)

log = logging.getLogger(__name__)

AUTO_MAX_TRIALS = 12  # greedy trials before giving up on the target (each costs one pass over the tuning images)


def apply_auto_preset(result: QuantizeResult, fp32_path: str | Path, tuning_images: list[Path],
                      imgsz: tuple[int, int], class_names: list[str], options: QuantizeOptions,
                      show_progress: bool = True) -> QuantizeResult:
    """Preset auto, after `quantize_int8_twins` calibrated everything: rank units by sensitivity on the tuning
    images, keep them precise greedily until the agreement target is met, rewrite both twins from that graph."""
    import onnx

    from packager.quantize.sensitivity import AgreementScorer, analyze, chosen, greedy_keep_precise
    from packager.quantize.qdq_graph import keep_precise

    if not tuning_images:
        raise ConfigError("--preset auto needs tuning images that are not calibration images: give more "
                         "--calib-images than --calib-size, or --tune-images DIR")
    started = time.perf_counter()
    all_int8 = onnx.load(str(result.int8_fp32_path))
    scorer = AgreementScorer(onnx.load(str(fp32_path)), tuning_images, imgsz, class_names)
    sensitivity = analyze(all_int8, scorer, refine=options.auto_refine, show_progress=show_progress)
    steps = greedy_keep_precise(all_int8, sensitivity.units, scorer, options.auto_target, AUTO_MAX_TRIALS,
                                show_progress=show_progress)
    choice = chosen(steps)
    units = [u for name in choice.kept_precise for u in sensitivity.units if u.unit == name]
    final = keep_precise(all_int8, [n for u in units for n in u.nodes])
    write_int8_twins(final, Path(result.int8_fp32_path).parent)
    result.excluded_nodes = sorted(set(result.excluded_nodes) | {n for u in units for n in u.nodes},
                                   key=node_order(all_int8))
    result.quantized_nodes = len(quantized_node_names(final))
    result.auto = AutoSelection(
        target=options.auto_target, tuning_images=sensitivity.images,
        met_target=choice.score.agreement >= options.auto_target, kept_precise=choice.kept_precise,
        final={"agreement": choice.score.agreement, "sqnr_db": choice.score.sqnr_db,
               "int8_mac_coverage": round(choice.int8_coverage, 5)},
        steps=[{"tried": s.unit, "accepted": s.accepted, "kept_precise": s.kept_precise,
                "agreement": s.score.agreement, "sqnr_db": s.score.sqnr_db,
                "int8_mac_coverage": round(s.int8_coverage, 5)} for s in steps],
        ranking=[{"unit": u.unit, "agreement_alone": u.alone.agreement, "sqnr_db_alone": u.alone.sqnr_db}
                 for u in sensitivity.units],
        all_int8={"agreement": sensitivity.all_int8.agreement, "sqnr_db": sensitivity.all_int8.sqnr_db},
        wall_time_s=round(time.perf_counter() - started, 1),
    )
    if not result.auto.met_target:
        log.warning("auto preset: %s", result.auto.reason())
    return result
