"""Stage 3: ModelOpt ONNX PTQ (INT8 twins, FP8 twins, FP16), Q/DQ graph surgery, label-free sensitivity and the
auto preset."""
