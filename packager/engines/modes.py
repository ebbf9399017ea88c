"""`yqpack engines`: where the plans of a gpu repository are built (compose, a host trtexec, the TensorRT Python
API) or only printed. The CLI parses the options; the dispatch lives here, beside the stage it drives."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from packager.engines import builder, host
from packager.engines.images import image_facts
from packager.engines.plans import TensorRTVersion, repository_engine_specs

MODES = ("compose", "trtexec", "local", "print")


def print_commands(repository: Path, tensorrt_version: str | None, plugins: list[Path],
                   echo: Callable[[str], None]) -> None:
    """The trtexec line of every plan, for the serving image's TensorRT (default: what deploy/.env declares)."""
    declared = tensorrt_version or image_facts().tensorrt
    version = TensorRTVersion.parse(declared if "." in declared else f"{declared}.0")
    for spec in repository_engine_specs(repository):
        echo(" ".join(builder.trtexec_command("trtexec", spec, version, spec.plan_path, plugins=plugins)))


# `compose` mode: docker compose's `engines` and `engine-check` services (packager/serve/compose.py), handed in by
# the CLI so that this stage does not import the serving one (the serving side imports the engine kit).
ComposeEngines = Callable[..., None]


def run_engines(repository: Path, build_dir: Path | None, mode: str, *, allow_missing: bool = False,
                tensorrt_version: str | None = None, compose_engines: ComposeEngines | None = None,
                echo: Callable[[str], None] = print) -> None:
    if build_dir is not None:
        host.stage_engine_sources(build_dir, repository)
    plugins = host.trt_plugin_libraries(build_dir)  # $YQPACK_TRT_PLUGINS, else the build's --trt-plugins
    if mode == "print":
        print_commands(repository, tensorrt_version, plugins, echo)
        return
    if mode == "compose":
        if compose_engines is None:
            raise ValueError("the compose mode needs packager.serve.compose.compose_engines")
        compose_engines(repository, allow_missing=allow_missing, trt_plugins=plugins)
    elif mode == "local":
        host.build_repository_engines_local(repository, allow_missing=allow_missing, plugins=plugins, report=echo)
    else:
        builder.build_repository_engines(repository, allow_missing=allow_missing, plugins=plugins, report=echo)
    if build_dir is not None:
        recorded = host.record_engines(build_dir, repository)
        echo(f"recorded {len(recorded)} engine key(s) in {build_dir / 'manifest.json'}")
