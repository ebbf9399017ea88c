"""Label-free agreement with FP32 on held-out images (not a test): does the auto choice carry over?

Scores configurations of one all-INT8 calibration (units kept precise, by name from a sensitivity.json) and the
build's own int8-fp32 twin on images never used for calibration or tuning (default: the 128 sample val images;
their labels are not used).

    PYTHONPATH=. .venv/bin/python benchmarks/heldout_agreement.py --build build/yolov8n \
        --all-int8 reports/auto_bench/all-int8.onnx --sensitivity reports/auto_bench/sensitivity.json \
        --config "auto 0.96=model.2,model.22/decode"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import onnx

from packager.assets import assets_dir
from packager.coco_eval import CocoGroundTruth
from packager.contracts import BuildManifest
from packager.manifest import artifact_path
from packager.qdq_graph import int8_conv_mac_share, keep_precise
from packager.sensitivity import AgreementScorer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", type=Path, required=True)
    parser.add_argument("--all-int8", type=Path, required=True, help="int8-fp32 ONNX with everything quantized")
    parser.add_argument("--sensitivity", type=Path, required=True, help="sensitivity.json (unit -> nodes)")
    parser.add_argument("--config", action="append", default=[], help="NAME=unit,unit,... (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("heldout_agreement.json"))
    args = parser.parse_args()
    manifest = BuildManifest.load(args.build)
    assets = assets_dir()
    ground_truth = CocoGroundTruth(assets / "coco" / "annotations" / "instances_val2017_128.json")
    images = ground_truth.image_files(assets / "coco" / "val2017")
    scorer = AgreementScorer(onnx.load(str(artifact_path(args.build, "fp32"))), images, manifest.model.imgsz,
                             list(manifest.model.class_names))
    all_int8 = onnx.load(str(args.all_int8))
    nodes = {u["unit"]: u["nodes"] for u in json.loads(args.sensitivity.read_text())["units"]}
    models = {"everything INT8": all_int8, "build preset": onnx.load(str(artifact_path(args.build, "int8-fp32")))}
    for config in args.config:
        name, units = config.split("=", 1)
        models[name] = keep_precise(all_int8, [n for unit in units.split(",") if unit for n in nodes[unit]])
    rows = {}
    for name, model in models.items():
        score = scorer.score(model)
        rows[name] = {"agreement": score.agreement, "sqnr_db": score.sqnr_db,
                      "int8_conv_mac_share": int8_conv_mac_share(model)}
        print(name, json.dumps(rows[name]), flush=True)
    args.out.write_text(json.dumps({"images": len(images), "configs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
