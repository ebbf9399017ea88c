"""Swapping a finished folder in: readers never find the path missing (renameat2 RENAME_EXCHANGE on Linux).

A reader thread polls a file inside the target while the main thread replaces the folder a few hundred times
(bounded). The same reader does see the gap of the two-rename fallback, so it is able to catch one."""

from __future__ import annotations

import os
import threading
import tempfile
from pathlib import Path

import pytest

from packager.core.files import exchange_paths, replace_directory

SWAPS = 300


def _staging(root: Path, content: str) -> Path:
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
    (staging / "whole").write_text(content)
    return staging


def _swaps_seen_by_a_reader(root: Path, atomic: bool) -> int:
    """Replace root/repo SWAPS times; returns how often a concurrent reader found no root/repo/whole."""
    target = root / "repo"
    replace_directory(_staging(root, "first"), target)
    stop, misses = threading.Event(), []

    def reader():
        while not stop.is_set():
            if not os.path.exists(target / "whole"):
                misses.append(1)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for index in range(SWAPS):
            replace_directory(_staging(root, str(index)), target, atomic=atomic)
    finally:
        stop.set()
        thread.join()
    assert (target / "whole").read_text() == str(SWAPS - 1)
    assert os.listdir(root) == ["repo"], "the previous folders and stagings must be gone"
    return len(misses)


def test_exchange_swaps_two_folders(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "name").write_text("a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "name").write_text("b")
    assert exchange_paths(tmp_path / "a", tmp_path / "b"), "this Linux test machine supports RENAME_EXCHANGE"
    assert (tmp_path / "a" / "name").read_text() == "b" and (tmp_path / "b" / "name").read_text() == "a"


def test_exchange_of_a_missing_path_is_an_error(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(FileNotFoundError):
        exchange_paths(tmp_path / "a", tmp_path / "missing")


def test_replacing_into_a_new_path_is_a_rename(tmp_path):
    staging = _staging(tmp_path, "new")
    replace_directory(staging, tmp_path / "out")
    assert (tmp_path / "out" / "whole").read_text() == "new" and not staging.exists()


def test_readers_never_see_the_folder_missing(tmp_path):
    assert _swaps_seen_by_a_reader(tmp_path, atomic=True) == 0


def test_the_reader_does_catch_the_two_rename_gap(tmp_path):
    # Without the exchange there is a moment with no folder; hundreds of swaps make the reader hit it.
    assert _swaps_seen_by_a_reader(tmp_path, atomic=False) > 0
