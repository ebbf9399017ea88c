"""The precision to serve (a pure function over verify's measured numbers and gates): per model family, the fastest
served precision that holds every gate it faces, its speed-up over each of the others, the faster precisions passed
over (and the gate each failed), and a precision that costs accuracy without being faster."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from packager.verify.gates import GateResult, ServedAccuracy
from packager.verify.loadtest import LevelResult

# Each precision and the more precise ones it must beat on speed to be worth its accuracy cost.
MORE_PRECISE = {"fp16": ("fp32",), "fp8": ("fp16", "fp32"), "int8": ("fp16", "fp32")}
# One run's throughput varies by a few percent: a smaller lead is named as such, not presented as a win.
NOISE_MARGIN = 0.05
# A family-wide gate: wrong annotations make every precision's accuracy numbers meaningless, not only the judge's.
FAMILY_GATES = ("annotations",)


@dataclass
class PrecisionCandidate:
    """One served precision of a family, as the recommendation weighed it."""

    model: str
    precision: str
    peak_throughput: float  # images/s, the best load level; 0.0 without load numbers
    peak_concurrency: int | None  # the level that reached it
    levels: list[int]  # concurrency levels measured
    failed_gates: list[GateResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failed_gates

    @property
    def measured(self) -> bool:
        return self.peak_throughput > 0


@dataclass
class Recommendation:
    """The precision to serve of one model family (precision None: none can be recommended, `sentence` says why)."""

    family: str
    precision: str | None
    model: str | None
    sentence: str
    speedups: dict[str, float] = field(default_factory=dict)  # the chosen's peak over each other precision's
    passed_over: list[str] = field(default_factory=list)  # faster precisions that failed a gate
    candidates: list[PrecisionCandidate] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def recommend_precisions(
    accuracy: Sequence[ServedAccuracy],
    load: Mapping[str, Sequence[LevelResult]],
    gates: Sequence[GateResult],
    steps: Mapping[str, Sequence[str]] | None = None,
    incomplete: str | None = None,
) -> list[Recommendation]:
    """One recommendation per model family of `accuracy`. A gate applies to a precision when it names its
    ensemble or one of its `steps` (ensemble -> step models, e.g. the bare detector); an annotation gate applies to
    the whole family. An incomplete run recommends nothing: its numbers prove nothing."""
    steps = steps or {}
    recommendations = []
    for family in dict.fromkeys(item.family for item in accuracy):
        members = [item for item in accuracy if item.family == family]
        family_models = {item.model for item in members}
        family_failures = [g for g in gates if g.gate in FAMILY_GATES and g.model in family_models and not g.passed]
        candidates = []
        for item in members:
            names = {item.model, *steps.get(item.model, ())}
            failed = [g for g in gates if g.model in names and not g.passed and g.gate not in FAMILY_GATES]
            candidates.append(_candidate(item, load.get(item.model, []), failed + family_failures))
        if incomplete is not None:
            recommendations.append(Recommendation(family, None, None, f"{family}: no precision to recommend: the "
                                                  f"run is incomplete ({incomplete})", candidates=candidates))
        else:
            recommendations.append(_recommend(family, candidates))
    return recommendations


def _candidate(item: ServedAccuracy, levels: Sequence[LevelResult], failed: list[GateResult]) -> PrecisionCandidate:
    best = max(levels, key=lambda level: level.throughput, default=None)
    peak = best.throughput if best is not None else 0.0
    return PrecisionCandidate(item.model, item.precision, peak, best.concurrency if best and peak > 0 else None,
                              [level.concurrency for level in levels], failed)


def _recommend(family: str, candidates: list[PrecisionCandidate]) -> Recommendation:
    measured = sorted((c for c in candidates if c.measured), key=lambda c: -c.peak_throughput)
    if not measured:
        return Recommendation(family, None, None, f"{family}: no precision to recommend: no load numbers were "
                              "measured", candidates=candidates)
    passing = [c for c in measured if c.passed]
    unmeasured = [c.precision for c in candidates if not c.measured]
    not_weighed = f". Not weighed (no load numbers): {', '.join(unmeasured)}" if unmeasured else ""
    if not passing:
        why = "; ".join(f"{c.precision} failed {_failures(c)}" for c in measured)
        return Recommendation(family, None, None, f"{family}: no precision to serve: every precision measured "
                              f"failed a gate ({why}){not_weighed}", candidates=candidates)
    chosen = passing[0]
    others = [c for c in candidates if c.measured and c is not chosen]  # in served order: fp32 first
    speedups = {c.precision: chosen.peak_throughput / c.peak_throughput for c in others}
    passed_over = [c for c in measured if c.peak_throughput > chosen.peak_throughput and not c.passed]
    levels = ", ".join(str(level) for level in chosen.levels)
    sentence = (f"{family}: serve {chosen.precision} ({chosen.peak_throughput:.1f} images/s at concurrency "
                f"{chosen.peak_concurrency}): "
                + (", ".join(f"{speedups[c.precision]:.2f}x {c.precision}" for c in others) or "the only precision "
                   "measured")
                + f" (peak images/s over concurrency {levels}); every gate held")
    sentence += "".join(
        f". Passed over {c.precision}, {c.peak_throughput / chosen.peak_throughput:.2f}x faster: it failed "
        f"{_failures(c)}" for c in passed_over)
    sentence += "".join(f". {note}" for note in _not_faster_notes(chosen, measured))
    sentence += not_weighed
    return Recommendation(family, chosen.precision, chosen.model, sentence, speedups,
                          [c.precision for c in passed_over], candidates)


def _not_faster_notes(chosen: PrecisionCandidate, measured: list[PrecisionCandidate]) -> list[str]:
    """A precision that gives up accuracy must be visibly faster than the more precise ones served, else say so."""
    by_precision = {c.precision: c for c in measured}
    notes = []
    for cheap in measured:
        slower_or_equal = [by_precision[p] for p in MORE_PRECISE.get(cheap.precision, ()) if p in by_precision
                           and cheap.peak_throughput <= by_precision[p].peak_throughput]
        if not slower_or_equal:
            continue
        names = " or ".join(c.precision for c in slower_or_equal)
        note = (f"{cheap.precision} is not faster than {names} here ({cheap.peak_throughput:.1f} vs "
                + " / ".join(f"{c.peak_throughput:.1f}" for c in slower_or_equal) + " images/s)")
        if chosen in slower_or_equal:
            note += (f": serve {chosen.precision}, {cheap.precision.upper()} would cost accuracy for nothing")
        notes.append(note)
    for other in measured:
        if (other is not chosen and other.passed and other.precision in MORE_PRECISE.get(chosen.precision, ())
                and chosen.peak_throughput < other.peak_throughput * (1 + NOISE_MARGIN)):
            notes.append(f"{chosen.precision} leads the more precise {other.precision} by only "
                         f"{chosen.peak_throughput / other.peak_throughput:.2f}x: under {NOISE_MARGIN:.0%}, within "
                         f"what one run varies")
    return notes


def _failures(candidate: PrecisionCandidate) -> str:
    if candidate.passed:
        return "nothing"
    return "; ".join(f"{g.gate} ({g.detail})" for g in candidate.failed_gates)
