#!/usr/bin/env python3
"""Compare each TensorRT plan of a yqpack repository with its ONNX (the compose `engine-check` service).

Runs in NVIDIA's TensorRT image with Polygraphy (deploy/Dockerfile.check); the logic lives in
packager/engines/check.py, mounted beside this script (deploy/../packager), like build_engines.py.
Usage: python3 check_engines.py /models [--allow-missing] [--plugins "/plugins/a.so;/plugins/b.so"]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from packager.engines.check import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
