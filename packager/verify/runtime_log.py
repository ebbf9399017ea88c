"""What really runs each served detector, read from the server's log: the `local` target's detector logs one
`yqpack-runtime {json}` line at load (runtime, label, fallback notes, INT8 self-check). The log is reachable only
for a server this machine started: the `yqpack serve` record for the verified URL names it (or the caller passes
it); for any other server what runs is not known."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from packager.core.contracts import StateFileError


class EnsembleWithDetector(Protocol):
    """What this module needs of a served ensemble (verify's ServedEnsemble), without importing result.py, which
    imports this module."""

    name: str
    detector: str | None

RUNTIME_LOG_TAG = "yqpack-runtime "  # as templates/detector/local/model.py writes it
NOT_KNOWN_REMOTE = "not known (remote server)"


@dataclass
class DetectorRuntime:
    """What runs one served detector; `logged` False: the log has no line for it (a detector of another target)."""

    ensemble: str
    detector: str
    logged: bool
    runtime: str | None = None
    label: str | None = None
    notes: list[str] = field(default_factory=list)  # fallbacks, e.g. INT8 moved to onnxruntime
    self_check: dict | None = None  # {passed, distance, tolerance, images} of an INT8 detector

    @property
    def fell_back(self) -> bool:
        return bool(self.notes) or (self.self_check is not None and not self.self_check.get("passed", True))

    def as_dict(self) -> dict:
        return asdict(self)


def find_server_log(url: str, explicit: Path | None = None) -> tuple[Path | None, str]:
    """(log path, where it came from): `explicit`, else the log of the recorded yqpack server at `url`; (None,
    why) when neither names one."""
    if explicit is not None:
        return Path(explicit), str(explicit)
    from packager.serve.records import read_state

    try:
        state = read_state()
    except (StateFileError, OSError):  # an unreadable record: no log from it
        state = None
    # Matched as verify/reference.py matches the build: the record's gRPC URL is always 127.0.0.1.
    if state is None or state.grpc_url != url.replace("localhost", "127.0.0.1"):
        return None, NOT_KNOWN_REMOTE
    if not state.log_path:  # a record rebuilt from the process has no log
        return None, "not known (the server record names no log)"
    return Path(state.log_path), f"{state.log_path} (log of the yqpack serve at {url})"


def runtime_lines(log: Path) -> dict[str, dict]:
    """Detector model -> its last `yqpack-runtime` record in `log` (a reload logs again); lines that do not parse
    are ignored. OSError when the log cannot be read."""
    records = {}
    decoder = json.JSONDecoder()
    with open(log, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if RUNTIME_LOG_TAG not in line:
                continue
            message = _message(line)
            start = message.find(RUNTIME_LOG_TAG)
            if start < 0:
                continue
            try:
                record, _ = decoder.raw_decode(message, start + len(RUNTIME_LOG_TAG))
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("model"), str):
                records[record["model"]] = record
    return records


def _message(line: str) -> str:
    """Triton 2.4x writes a log message as a quoted, escaped string after `] `; older versions write it bare."""
    quoted = line.find('] "')
    if quoted >= 0:
        try:
            message = json.loads(line[quoted + 2:].rstrip("\r\n"))
            if isinstance(message, str):
                return message
        except ValueError:
            pass
    return line


def detector_runtimes(models: Sequence[EnsembleWithDetector], url: str,
                      explicit_log: Path | None = None) -> tuple[list[DetectorRuntime], str]:
    """What runs the detector of each served ensemble, and where that was read (or why it is not known)."""
    log, source = find_server_log(url, explicit_log)
    if log is None:
        return [], source
    try:
        records = runtime_lines(log)
    except OSError as error:
        return [], f"not known (the server log {log} cannot be read: {error.strerror or error})"
    runtimes = []
    for model in models:
        if not model.detector:
            continue
        record = records.get(model.detector)
        if record is None:
            runtimes.append(DetectorRuntime(model.name, model.detector, logged=False))
            continue
        notes = record.get("notes")
        check = record.get("self_check")
        runtimes.append(DetectorRuntime(
            model.name, model.detector, True, _text(record.get("runtime")), _text(record.get("label")),
            [str(note) for note in notes] if isinstance(notes, list) else [],
            check if isinstance(check, dict) else None))
    return runtimes, source


def _text(value) -> str | None:
    return value if isinstance(value, str) else None
