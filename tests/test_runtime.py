"""packager.inference.runtime with the real onnxruntime and OpenVINO: FP32 stays FP32, INT8 runs on integer kernels,
the compiled-model cache, and the CPU instruction-set fallback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from packager.pipeline.manifest import artifact_path
from packager.inference.runtime import (
    NO_CHECK_IMAGES_NOTE,
    SATURATION_NOTE,
    RuntimeOptions,
    cpu_flags,
    cpu_vendor,
    int8_isa,
    is_quantized,
    open_exactly,
    open_model,
    resolve_runtime,
)

# The flags line of this development machine's /proc/cpuinfo (Intel Xeon, Emerald Rapids class, KVM), verbatim.
XEON_CPUINFO = (
    "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\n"
    "flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 "
    "ss ht syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid tsc_known_freq pni "
    "pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand "
    "hypervisor lahf_lm abm 3dnowprefetch cpuid_fault ssbd ibrs ibpb stibp ibrs_enhanced fsgsbase tsc_adjust bmi1 "
    "avx2 smep bmi2 erms invpcid avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd sha_ni "
    "avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves avx_vnni avx512_bf16 wbnoinvd arat avx512vbmi umip pku ospke "
    "avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq rdpid bus_lock_detect cldemote "
    "movdiri movdir64b fsrm md_clear serialize tsxldtrk ibt amx_bf16 avx512_fp16 amx_tile amx_int8 flush_l1d "
    "arch_capabilities\nbugs\t\t: spectre_v1 spectre_v2\n"
)
# An x86-64 CPU from before SSE4.2 (OpenVINO's minimum), and an AVX2 one without VNNI/AMX/BF16.
OLD_FLAGS = frozenset("fpu sse sse2 ssse3 sse4_1 cx16 lm".split())
AVX2_FLAGS = frozenset("fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c".split())
OPENVINO = RuntimeOptions("openvino")
VNNI = cpu_flags(XEON_CPUINFO)


def openvino_int8(build, options: RuntimeOptions = OPENVINO):
    """The INT8 u8 twin opened on OpenVINO whatever this CPU computes right: for tests of OpenVINO's mechanics
    (buffers, pinning, cache, integer kernels) only. Which file runs where, and the self-check guarding it, are
    tests/test_int8_cpu.py's."""
    return open_exactly(artifact_path(build, "int8-u8"), options)


@pytest.fixture(scope="module")
def batch(yolov8n_build) -> np.ndarray:
    """Two real letterboxed calibration images."""
    return np.ascontiguousarray(np.load(yolov8n_build / "calib.npy", mmap_mode="r")[:2], dtype=np.float32)


def test_fp32_with_the_f32_hint_matches_onnxruntime(yolov8n_build, batch):
    path = artifact_path(yolov8n_build, "fp32")
    ours, reference = open_model(path, OPENVINO), open_model(path, RuntimeOptions("onnxruntime"))
    assert (ours.runtime, ours.label, reference.runtime) == ("openvino", "openvino (f32 hint)", "onnxruntime")
    assert str(ours._compiled.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"
    got, want = ours.run(batch), reference.run(batch)
    assert got.shape == want.shape == (2, 84, 8400)
    # Class scores (0..1) within 1e-3 absolute; box coordinates (pixels, up to 640) within 1e-3 relative.
    np.testing.assert_allclose(got[:, 4:], want[:, 4:], rtol=0, atol=1e-3)
    np.testing.assert_allclose(got[:, :4], want[:, :4], rtol=1e-3, atol=1e-3)


def test_int8_model_runs_integer_kernels(yolov8n_build):
    int8 = openvino_int8(yolov8n_build).layer_precisions()
    fp32 = open_model(artifact_path(yolov8n_build, "fp32"), OPENVINO, flags=VNNI).layer_precisions()
    integer = lambda counts: sum(n for p, n in counts.items() if p in ("i8", "u8"))  # noqa: E731
    # ModelOpt quantizes yolov8n's backbone/neck convolutions; OpenVINO must execute them as int8/u8 layers.
    assert integer(int8["Convolution"]) >= 40, int8["Convolution"]
    assert integer(int8["Convolution"]) > int8["Convolution"].get("f32", 0)
    assert not any(integer(counts) for counts in fp32.values()), fp32


def test_borrowed_output_and_shared_input_give_the_same_numbers(yolov8n_build, batch):
    """The served detector's fast path: OpenVINO reads the input in place and lends its output buffer. Same values
    as `run`; the input is left untouched; a borrowed output is the request's buffer, overwritten by the next call,
    while `run`'s result is the caller's own."""
    model = openvino_int8(yolov8n_build)
    first, second = batch[:1], batch[1:]
    before = first.copy()
    owned = model.run(first)
    borrowed = model.run_borrowed(first)
    np.testing.assert_array_equal(borrowed, owned)
    np.testing.assert_array_equal(first, before)
    model.run_borrowed(second)
    np.testing.assert_array_equal(borrowed, model.run(second))  # the lent buffer now holds the second image
    assert not np.array_equal(owned, borrowed)
    # a non-C-contiguous batch (same values, Fortran order) is copied first, not misread
    fortran = np.asfortranarray(first)
    assert not fortran.flags.c_contiguous
    np.testing.assert_array_equal(model.run(fortran), owned)


def test_unpinned_threads_reach_openvino_and_change_no_number(yolov8n_build, batch):
    """The served detector runs OpenVINO unpinned (it shares the cores with pre/postprocess): a scheduling
    setting only, the outputs are the same bits as pinned."""
    pinned = openvino_int8(yolov8n_build)
    unpinned = openvino_int8(yolov8n_build, RuntimeOptions("openvino", cpu_pinning=False))
    assert pinned._compiled.get_property("ENABLE_CPU_PINNING") is True
    assert unpinned._compiled.get_property("ENABLE_CPU_PINNING") is False
    np.testing.assert_array_equal(unpinned.run(batch), pinned.run(batch))


def test_onnxruntime_has_no_execution_graph(yolov8n_build):
    with pytest.raises(ValueError, match="execution graph"):
        open_model(artifact_path(yolov8n_build, "fp32"), RuntimeOptions("onnxruntime")).layer_precisions()


def test_compiled_model_cache_is_written_and_reused(yolov8n_build, batch, tmp_path):
    cache = tmp_path / "cache"
    first = openvino_int8(yolov8n_build, RuntimeOptions("openvino", cache_dir=str(cache)))
    blobs = sorted(cache.glob("*.blob"))
    assert blobs, f"no compiled blob in {cache}: {list(cache.iterdir())}"
    stamps = [blob.stat().st_mtime_ns for blob in blobs]
    second = openvino_int8(yolov8n_build, RuntimeOptions("openvino", cache_dir=str(cache)))
    assert [blob.stat().st_mtime_ns for blob in sorted(cache.glob("*.blob"))] == stamps, "recompiled, not reused"
    np.testing.assert_array_equal(second.run(batch), first.run(batch))


def test_this_machines_flags_choose_openvino_with_amx():
    flags = cpu_flags(XEON_CPUINFO)
    assert {"sse4_2", "avx512_vnni", "amx_int8", "amx_bf16"} <= flags and len(flags) > 100
    assert int8_isa(flags) == "AMX-INT8"
    assert resolve_runtime(OPENVINO, flags) == resolve_runtime(OPENVINO, flags, True)
    choice = resolve_runtime(RuntimeOptions("openvino", precision_hint="bf16"), flags)
    assert (choice.runtime, choice.precision_hint, choice.notes) == ("openvino", "bf16", ())
    # the live /proc/cpuinfo parses too, and any x86-64 that runs this suite has OpenVINO's minimum
    live = cpu_flags(Path("/proc/cpuinfo").read_text())
    assert "sse4_2" in live and resolve_runtime(OPENVINO, live).runtime == "openvino"


def test_missing_instruction_set_falls_back_to_onnxruntime_with_a_message(yolov8n_build, batch):
    choice = resolve_runtime(OPENVINO, OLD_FLAGS)
    assert choice.runtime == "onnxruntime"
    assert "SSE4_2" in choice.notes[0] and "falling back to onnxruntime" in choice.notes[0]
    # open_model follows the decision for real
    model = open_model(artifact_path(yolov8n_build, "fp32"), OPENVINO, flags=OLD_FLAGS)
    assert model.runtime == "onnxruntime" and model.choice.notes == choice.notes
    assert model.run(batch).shape == (2, 84, 8400)


def test_unsupported_extensions_are_named():
    no_vnni = resolve_runtime(RuntimeOptions("openvino", precision_hint="bf16"), AVX2_FLAGS)
    assert (no_vnni.runtime, no_vnni.precision_hint) == ("openvino", "f32")
    assert no_vnni.notes == ("bf16 was requested but this CPU has neither AMX-BF16 nor AVX512-BF16: running f32.",)
    quantized = resolve_runtime(RuntimeOptions("openvino", precision_hint="bf16"), AVX2_FLAGS, quantized=True)
    assert quantized.runtime == "onnxruntime" and quantized.notes == (*no_vnni.notes, SATURATION_NOTE)
    assert resolve_runtime(OPENVINO, VNNI, quantized=True).runtime == "openvino"
    missing = resolve_runtime(OPENVINO, cpu_flags(XEON_CPUINFO), openvino_installed=False)
    assert missing.runtime == "onnxruntime" and "not installed" in missing.notes[0]
    assert resolve_runtime(RuntimeOptions("onnxruntime"), OLD_FLAGS).notes == ()
    # ARM's /proc/cpuinfo has "Features", no "flags": nothing to judge, OpenVINO runs and says so
    arm = resolve_runtime(OPENVINO, cpu_flags("processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32\n"))
    assert arm.runtime == "openvino" and "no x86 instruction-set flags" in arm.notes[0]


def test_invalid_options_are_plain_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'"):
        RuntimeOptions("tensorrt")
    with pytest.raises(ValueError, match="unknown precision hint 'fp8'"):
        RuntimeOptions("openvino", precision_hint="fp8")
    with pytest.raises(FileNotFoundError, match="model not found"):
        open_model(tmp_path / "missing.onnx")


def test_a_quantized_model_leaves_openvino_without_vnni(yolov8n_build, batch):
    """OpenVINO's INT8 kernels saturate on AVX2-only CPUs (wrong detections, not only slower): without VNNI/AMX a
    Q/DQ model opens on onnxruntime, whose outputs it then is; a float model stays on OpenVINO."""
    int8_path, fp32_path = artifact_path(yolov8n_build, "int8-fp32"), artifact_path(yolov8n_build, "fp32")
    assert is_quantized(int8_path) and not is_quantized(fp32_path)
    model = open_model(int8_path, OPENVINO, flags=AVX2_FLAGS)
    assert model.runtime == "onnxruntime" and model.choice.notes == (SATURATION_NOTE,)
    np.testing.assert_array_equal(model.run(batch), open_model(int8_path, RuntimeOptions("onnxruntime")).run(batch))
    assert open_model(fp32_path, OPENVINO, flags=AVX2_FLAGS).runtime == "openvino"
    # with VNNI/AMX, still never on OpenVINO unchecked: without the build's self-check images it stays on onnxruntime
    unchecked = open_model(int8_path, OPENVINO, flags=VNNI)
    assert unchecked.runtime == "onnxruntime" and unchecked.choice.notes == (NO_CHECK_IMAGES_NOTE,)


# The head of /proc/cpuinfo of an AMD EPYC 9004 (Zen 4) KVM guest, this project's development machine.
GENOA_CPUINFO = (
    "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n"
    "flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c avx512f avx512dq avx512bw avx512vl avx512_bf16 "
    "avx512_vnni avx512vbmi\n"
)


def test_the_vendor_does_not_decide():
    """An AMD EPYC 9004 that reports AVX512-VNNI computes the u8-activation twin right on OpenVINO (measured: INT8
    mAP within 0.001 of onnxruntime's, docs/cpu-openvino.md), as an Intel VNNI CPU does: the instruction set decides."""
    genoa = cpu_flags(GENOA_CPUINFO)
    assert cpu_vendor(GENOA_CPUINFO) == "AuthenticAMD" and cpu_vendor(XEON_CPUINFO) == "GenuineIntel"
    assert cpu_vendor("processor\t: 0\nFeatures\t: fp asimd\n") is None
    choice = resolve_runtime(OPENVINO, genoa, quantized=True)
    assert (choice.runtime, choice.int8_activations, choice.int8_isa) == ("openvino", "u8", "AVX512-VNNI")
