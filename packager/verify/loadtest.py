"""gRPC load generation against a Triton server (tritonclient asyncio): requests, latency stats, server timings.

A fixed number of requests (or a duration) is spread over `concurrency` in-flight requests. Per-request errors
are counted with their first messages; when the server or the model disappears mid-run the level is aborted
with the contract's `ServerGoneError`, so callers can mark the run incomplete instead of reporting numbers from a dead server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from packager.core.contracts import ConfigError, ServerGoneError

# How many distinct error messages are kept per level (the count is always complete).
MAX_ERROR_MESSAGES = 5
# Longest wait for the server's statistics to count the last requests of a level.
STATS_SETTLE_S = 2.0
# gRPC status codes after which the server/model is probed: they mean "gone", not "this request was bad".
_SUSPICIOUS_STATUSES = ("UNAVAILABLE", "NOT_FOUND", "CANCELLED", "UNKNOWN", "INTERNAL", "DEADLINE_EXCEEDED")


@dataclass
class LatencyStats:
    count: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float


def latency_stats(latencies_s: Sequence[float]) -> LatencyStats:
    """Percentiles of successful request latencies (linear interpolation, as numpy.percentile)."""
    if len(latencies_s) == 0:
        nan = float("nan")
        return LatencyStats(0, nan, nan, nan, nan, nan)
    ms = np.asarray(latencies_s, dtype=np.float64) * 1000.0
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return LatencyStats(len(ms), float(ms.mean()), float(p50), float(p90), float(p99), float(ms.max()))


@dataclass
class StepTiming:
    """Server-side averages for one model (ensemble or one of its steps) over one load level."""

    model: str
    requests: int
    executions: int
    avg_batch: float
    queue_ms: float
    compute_input_ms: float
    compute_infer_ms: float
    compute_output_ms: float

    @property
    def compute_ms(self) -> float:
        return self.compute_input_ms + self.compute_infer_ms + self.compute_output_ms


def step_timings(before: dict, after: dict, models: Sequence[str]) -> list[StepTiming]:
    """Per-request queue/compute averages between two `get_inference_statistics(as_json=True)` snapshots."""
    old, new = _stats_by_model(before), _stats_by_model(after)
    timings = []
    for model in models:
        if model not in new:
            continue
        prev = old.get(model, {})
        requests = _delta(prev, new[model], "inference_stats", "success", "count")
        executions = _counter(new[model], "execution_count") - _counter(prev, "execution_count")
        per_request_ms = (lambda ns: ns / requests / 1e6) if requests else (lambda ns: float("nan"))
        timings.append(
            StepTiming(
                model=model,
                requests=requests,
                executions=executions,
                avg_batch=(_counter(new[model], "inference_count") - _counter(prev, "inference_count"))
                / executions
                if executions
                else float("nan"),
                queue_ms=per_request_ms(_delta(prev, new[model], "inference_stats", "queue", "ns")),
                compute_input_ms=per_request_ms(_delta(prev, new[model], "inference_stats", "compute_input", "ns")),
                compute_infer_ms=per_request_ms(_delta(prev, new[model], "inference_stats", "compute_infer", "ns")),
                compute_output_ms=per_request_ms(
                    _delta(prev, new[model], "inference_stats", "compute_output", "ns")
                ),
            )
        )
    return timings


def _stats_by_model(snapshot: dict) -> dict[str, dict]:
    # Several versions of one model would be summed by Triton's own tools; yqpack serves version 1 only.
    return {entry["name"]: entry for entry in snapshot.get("model_stats", [])}


def _counter(entry: dict, *keys: str) -> int:
    value = entry
    for key in keys:
        if not isinstance(value, dict):
            return 0
        value = value.get(key, 0)
    return int(value or 0)  # protobuf JSON renders 64-bit counters as strings


def _delta(prev: dict, new: dict, *keys: str) -> int:
    return _counter(new, *keys) - _counter(prev, *keys)


@dataclass
class LevelResult:
    """One concurrency level against one model."""

    model: str
    concurrency: int
    requests: int
    errors: int
    error_messages: list[str]
    duration_s: float
    throughput: float  # successful requests (images) per second
    latency: LatencyStats
    server_steps: list[StepTiming] = field(default_factory=list)

    def as_dict(self) -> dict:
        data = asdict(self)
        for step, timing in zip(data["server_steps"], self.server_steps):
            step["compute_ms"] = timing.compute_ms
        return data


@dataclass
class RequestOutcome:
    index: int
    latency_s: float
    output: np.ndarray | None  # the requested output, when `keep_output` is set
    error: str | None


# Builds the inputs of request `i` (requests cycle over the payloads).
InputFactory = Callable[[int], list]


def image_inputs(payloads: Sequence[bytes], input_name: str = "IMAGE") -> InputFactory:
    """Requests carrying one encoded image file each, as a [1, 1] BYTES tensor (the ensemble contract)."""

    def make(index: int) -> list:
        data = np.empty((1, 1), dtype=object)
        data[0, 0] = payloads[index % len(payloads)]
        tensor = grpcclient.InferInput(input_name, [1, 1], "BYTES")
        tensor.set_data_from_numpy(data)
        return [tensor]

    return make


def tensor_inputs(tensor: np.ndarray, input_name: str) -> InputFactory:
    """Requests carrying one preprocessed FP32 tensor with a leading batch dimension (bare detector)."""
    batch = np.ascontiguousarray(tensor[None].astype(np.float32))

    def make(index: int) -> list:
        item = grpcclient.InferInput(input_name, list(batch.shape), "FP32")
        item.set_data_from_numpy(batch)
        return [item]

    return make


class TritonLoad:
    """An asyncio gRPC connection that drives requests against one server."""

    def __init__(self, url: str, timeout_s: float | None = 30.0):
        self.url = url
        self.timeout_s = timeout_s
        self.client = grpcclient.InferenceServerClient(url=url)

    async def close(self) -> None:
        await self.client.close()

    async def server_gone_reason(self, model: str) -> str | None:
        """None when the server is live and `model` is ready, else a plain reason."""
        try:
            if not await self.client.is_server_live(client_timeout=5):
                return f"server at {self.url} is not live"
            if not await self.client.is_model_ready(model, client_timeout=5):
                return f"model {model} is no longer ready (unloaded?)"
        except InferenceServerException as error:
            return f"server at {self.url} stopped answering: {_message(error)}"
        return None

    async def drive(
        self,
        model: str,
        make_inputs: InputFactory,
        *,
        concurrency: int,
        requests: int | None = None,
        duration_s: float | None = None,
        parameters: dict | None = None,
        output_name: str | None = None,
        on_done: Callable[[RequestOutcome], None] | None = None,
    ) -> tuple[list[RequestOutcome], float]:
        """Run `requests` requests (or for `duration_s`) with `concurrency` in flight; returns outcomes, wall time.

        Raises ServerGoneError when a failure turns out to be the server or model disappearing.
        """
        if (requests is None) == (duration_s is None):
            raise ConfigError("give either a request count or a duration")
        if concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
        outputs = [grpcclient.InferRequestedOutput(output_name)] if output_name else None
        outcomes: list[RequestOutcome] = []
        next_index = 0
        start = time.perf_counter()
        deadline = start + duration_s if duration_s is not None else None
        probe_lock = asyncio.Lock()

        async def worker() -> None:
            nonlocal next_index
            while True:
                if requests is not None and next_index >= requests:
                    return
                if deadline is not None and time.perf_counter() >= deadline:
                    return
                index = next_index
                next_index += 1
                outcome = await self._one(model, make_inputs(index), index, parameters, outputs, output_name)
                outcomes.append(outcome)
                if on_done is not None:
                    on_done(outcome)
                if outcome.error is not None and outcome.error.startswith(_SUSPICIOUS_STATUSES):
                    async with probe_lock:
                        reason = await self.server_gone_reason(model)
                    if reason is not None:
                        raise ServerGoneError(f"{reason} (last request error: {outcome.error})")

        tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return outcomes, time.perf_counter() - start

    async def _one(self, model, inputs, index, parameters, outputs, output_name) -> RequestOutcome:
        began = time.perf_counter()
        try:
            result = await self.client.infer(
                model, inputs, outputs=outputs, parameters=parameters, client_timeout=self.timeout_s
            )
        except InferenceServerException as error:
            return RequestOutcome(index, time.perf_counter() - began, None, _message(error))
        latency = time.perf_counter() - began
        output = result.as_numpy(output_name) if output_name else None
        if output_name and output is None:
            return RequestOutcome(index, latency, None, f"response has no output {output_name}")
        return RequestOutcome(index, latency, output, None)

    async def statistics(self) -> dict:
        try:
            return await self.client.get_inference_statistics(as_json=True, client_timeout=10)
        except InferenceServerException as error:
            raise ServerGoneError(f"server at {self.url} stopped answering: {_message(error)}") from error

    async def run_level(
        self,
        model: str,
        make_inputs: InputFactory,
        concurrency: int,
        *,
        requests: int | None = None,
        duration_s: float | None = None,
        step_models: Sequence[str] = (),
        on_done: Callable[[RequestOutcome], None] | None = None,
    ) -> LevelResult:
        """One measured concurrency level, with server-side timings of `model` and its `step_models`."""
        before = await self.statistics()
        outcomes, wall = await self.drive(
            model, make_inputs, concurrency=concurrency, requests=requests, duration_s=duration_s, on_done=on_done
        )
        models = [model, *step_models]
        successes = sum(outcome.error is None for outcome in outcomes)
        after = await self.statistics()
        # Triton records a request's statistics just after sending its response: give the last ones a moment.
        settle_until = time.perf_counter() + STATS_SETTLE_S
        while time.perf_counter() < settle_until and any(
            timing.requests < successes for timing in step_timings(before, after, models)
        ):
            await asyncio.sleep(0.05)
            after = await self.statistics()
        return summarize_level(model, concurrency, outcomes, wall, step_timings(before, after, models))


def summarize_level(
    model: str, concurrency: int, outcomes: Sequence[RequestOutcome], wall_s: float, steps: list[StepTiming]
) -> LevelResult:
    ok = [outcome.latency_s for outcome in outcomes if outcome.error is None]
    errors = [outcome.error for outcome in outcomes if outcome.error is not None]
    return LevelResult(
        model=model,
        concurrency=concurrency,
        requests=len(outcomes),
        errors=len(errors),
        error_messages=first_distinct(errors, MAX_ERROR_MESSAGES),
        duration_s=wall_s,
        throughput=len(ok) / wall_s if wall_s > 0 else 0.0,
        latency=latency_stats(ok),
        server_steps=steps,
    )


def first_distinct(messages: Sequence[str], limit: int) -> list[str]:
    seen: list[str] = []
    for message in messages:
        if message not in seen:
            seen.append(message)
            if len(seen) == limit:
                break
    return seen


def _message(error: InferenceServerException) -> str:
    status = error.status() or ""
    text = error.message() or str(error)
    return f"{status.replace('StatusCode.', '')}: {text}" if status else text
