"""yqpack: take a YOLO detector to a served, verified Triton deployment (see README.md)."""
