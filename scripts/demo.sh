#!/usr/bin/env bash
# The main job end to end on the sample assets, install included:
#   build (export, calibrate, quantize, ONNX gate, render) -> serve --detach -> verify -> stop
# Writes build/yolov8n/, model_repository/ and reports/demo/ (all git-ignored). Exit code: verify's (0 = all gates held).
# Extra arguments go to `yqpack verify`, e.g. scripts/demo.sh --requests 200
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh

ASSETS="${YQPACK_ASSETS:-../shared/assets}"
VAL_IMAGES="$ASSETS/coco/val2017"
VAL_ANNOTATIONS="$ASSETS/coco/annotations/instances_val2017_128.json"
YQPACK=.venv/bin/yqpack
GRPC_PORT="${GRPC_PORT:-8001}" HTTP_PORT="${HTTP_PORT:-8000}" METRICS_PORT="${METRICS_PORT:-8002}"

"$YQPACK" build --model "$ASSETS/weights/yolov8n.pt" --out build/yolov8n \
  --calib-images "$ASSETS/coco/calib2017" --calib-size 64 \
  --val-images "$VAL_IMAGES" --val-annotations "$VAL_ANNOTATIONS" \
  --repository model_repository --target local
"$YQPACK" serve --repository model_repository --detach \
  --grpc-port "$GRPC_PORT" --http-port "$HTTP_PORT" --metrics-port "$METRICS_PORT"
trap '"$YQPACK" stop' EXIT
status=0
"$YQPACK" verify --url "127.0.0.1:$GRPC_PORT" --images "$VAL_IMAGES" --annotations "$VAL_ANNOTATIONS" \
  --build build/yolov8n --report-dir reports/demo --requests 48 "$@" || status=$?
echo "verify exit code $status; tables in reports/demo/report.md"
exit "$status"
