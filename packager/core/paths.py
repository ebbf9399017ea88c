"""Where yqpack's shipped files (templates, deploy), the sample assets and its own writable state are.

Shipped files: a wheel carries `templates/` and `deploy/` inside the package (pyproject.toml maps the top-level
folders to `packager/templates` and `packager/deploy_files`); a source checkout keeps them at the top level.
State (server env, caches, pid files): $YQPACK_HOME, else `<checkout>/.yqpack` when running from a source
checkout (scripts/install.sh and the tests rely on it), else a per-user folder ($XDG_STATE_HOME/yqpack, default
~/.local/state/yqpack) — never inside site-packages.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # packager/ (this file is packager/core/paths.py)
PROJECT_ROOT = PACKAGE_DIR.parent  # the checkout in a source tree; site-packages in an installed wheel


def _shipped(packaged: str, top_level: str) -> Path:
    """A data folder inside the installed package, else the checkout's top-level folder."""
    inside = resources.files("packager") / packaged
    if inside.is_dir():
        return Path(str(inside))  # a plain directory install (zip imports are not supported)
    return PROJECT_ROOT / top_level


TEMPLATES_DIR = _shipped("templates", "templates")
DEPLOY_DIR = _shipped("deploy_files", "deploy")


def is_source_checkout() -> bool:
    """True when packager/ sits in a yqpack source tree (plain or editable install), not in site-packages."""
    return (PROJECT_ROOT / "pyproject.toml").is_file() and (PROJECT_ROOT / "templates").is_dir()


def assets_dir() -> Path:
    """Sample assets (read-only): $YQPACK_ASSETS, default ../shared/assets beside the checkout."""
    return Path(os.environ.get("YQPACK_ASSETS", PROJECT_ROOT.parent / "shared" / "assets")).resolve()


def yqpack_home() -> Path:
    """yqpack's own writable state: $YQPACK_HOME, else <checkout>/.yqpack, else the per-user state folder."""
    if os.environ.get("YQPACK_HOME"):
        return Path(os.environ["YQPACK_HOME"]).expanduser().resolve()
    if is_source_checkout():
        return PROJECT_ROOT / ".yqpack"
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return (Path(state).expanduser() / "yqpack").resolve()


def ultralytics_offline_env(config_dir: Path | None = None) -> None:
    """Keep Ultralytics from reaching the network (no hub downloads, no auto-install, no font fetch)."""
    config_dir = Path(config_dir or yqpack_home() / "ultralytics")
    config_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "0")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(config_dir))
