#!/usr/bin/env python3
"""The `triton` service's entry point: say which models are not served and why, then exec tritonserver.

Runs with the serving image's own Python (standard library only); the logic lives in packager/engines/serving.py,
mounted beside this script (deploy/../packager), like build_engines.py.
Usage: python3 start_triton.py tritonserver --model-repository=/models [tritonserver options]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from packager.core.contracts import YqpackError  # noqa: E402
from packager.engines.serving import main  # noqa: E402

if __name__ == "__main__":
    try:
        main()
    except YqpackError as error:
        print(f"Error: {error}", file=sys.stderr)
        sys.exit(1)
