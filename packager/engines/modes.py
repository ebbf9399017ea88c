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


def run_engines(repository: Path, build_dir: Path | None, mode: str, *, allow_missing: bool = False,
                tensorrt_version: str | None = None, echo: Callable[[str], None] = print) -> None:
    from packager.serve.compose import compose_engines, trt_plugin_libraries

    if build_dir is not None:
        host.stage_engine_sources(build_dir, repository)
    plugins = trt_plugin_libraries(build_dir)  # $YQPACK_TRT_PLUGINS, else the build's --trt-plugins
    if mode == "print":
        print_commands(repository, tensorrt_version, plugins, echo)
        return
    if mode == "compose":
        compose_engines(repository, allow_missing=allow_missing, trt_plugins=plugins)
    elif mode == "local":
        host.build_repository_engines_local(repository, allow_missing=allow_missing, plugins=plugins, report=echo)
    else:
        builder.build_repository_engines(repository, allow_missing=allow_missing, plugins=plugins, report=echo)
    if build_dir is not None:
        recorded = host.record_engines(build_dir, repository)
        echo(f"recorded {len(recorded)} engine key(s) in {build_dir / 'manifest.json'}")
