#!/usr/bin/env python3
"""Build the TensorRT plans of a yqpack model repository with trtexec (the compose `engines` service).

Runs with the tritonserver image's own Python (standard library only). The logic lives in packager/engines/builder.py,
mounted beside this script (deploy/../packager), so the CLI, the tests and the container share one code path.
Usage: python3 build_engines.py /models [--allow-missing] [--timing-cache-dir /trt_cache] [--trtexec PATH]
       [--plugins "/plugins/a.so;/plugins/b.so"]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from packager.engines.builder import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
