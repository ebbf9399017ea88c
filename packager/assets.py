"""Where the sample assets and yqpack's own working folders are."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TEMPLATES_DIR = PROJECT_ROOT / "templates"


def assets_dir() -> Path:
    """Sample assets (read-only): $YQPACK_ASSETS, default ../shared/assets beside the checkout."""
    return Path(os.environ.get("YQPACK_ASSETS", PROJECT_ROOT.parent / "shared" / "assets")).resolve()


def yqpack_home() -> Path:
    """yqpack's own writable state (server env, caches, pid files): $YQPACK_HOME, default ./.yqpack."""
    return Path(os.environ.get("YQPACK_HOME", Path.cwd() / ".yqpack")).resolve()


def ultralytics_offline_env(config_dir: Path | None = None) -> None:
    """Keep Ultralytics from reaching the network (no hub downloads, no auto-install, no font fetch)."""
    config_dir = Path(config_dir or yqpack_home() / "ultralytics")
    config_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "0")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(config_dir))
