"""Local COCO evaluation of a build's ONNX variants (the build gate and `yqpack eval-onnx`)."""
