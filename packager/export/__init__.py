"""Stage 1: Ultralytics .pt/.yaml -> ONNX (dynamic batch, fixed HxW) and the typed ModelSpec."""
