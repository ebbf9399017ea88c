"""Code that runs inside the served Python models as well as in-process: the letterbox, image-header checks,
decode + NMS, request parameters, the ONNX runtimes. The renderer copies these files flat next to each model.py,
so they import nothing else of yqpack (only each other, relatively, with a flat fallback)."""
