"""yqpack command line: parses options and calls the stage modules; no pipeline logic lives here."""

from __future__ import annotations

import sys

import click


class YqpackError(click.ClickException):
    """A user-facing failure: printed as 'Error: ...' and exit code 1, no traceback."""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="yqpack")
def main() -> None:
    """Take a YOLO detector to a served, verified Triton deployment."""


# --- build / eval-onnx commands (issue 2) ---

# --- serve / stop commands (issue 3) ---

# --- verify command (issue 4) ---

# --- engines command (issue 5) ---


if __name__ == "__main__":
    sys.exit(main())
