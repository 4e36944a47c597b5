"""bench/step_split.py: a profiled step's kernels summed by kind, from the trace bench/step_probes.py exports."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest

from bench.step_split import kind_of, split
from tests.conftest import REPO

KERNELS = [  # (name, µs), as in an H100 trace of ftw's 8B step
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_badd_coopA_NNT", 621.0),
    ("nvjet_sm90_tst_64x32_64x16_2x1_v_bz_TTT", 39.6),
    ("nvjet_sm90_tss_32x64_64x16_1x2_h_bz_splitK_NTN", 27.3),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float>", 2.4),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x128_1x4x1_cga1x1", 862.9),
    ("void cudnn::fusion::compute_dot_do_o_specialized<true, 128>(void const*)", 91.9),
    ("void flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, cutlass::bfloat16_t>>", 80.1),
    ("fmha_cutlassB_bf16_aligned_64x64_k128_sm80", 120.4),
    ("_swiglu_bwd_term", 504.6),
    ("triton_poi_fused__to_copy_add_mul_rsub_sigmoid_2", 473.8),
    ("_rmsnorm_bwd", 88.5),
    ("_rms_layernorm_backward", 68.3),
    ("_rope", 31.5),
    ("_ce_rows", 1098.1),
    ("void at::native::multi_tensor_apply_kernel<at::native::FusedAdamMathFunctor>", 34.9),
    ("Memcpy DtoD (Device -> Device)", 41.3),
    ("triton_poi_fused_add_view_6", 69.8),
]


def test_each_kernel_falls_in_its_kind():
    kinds = [kind_of(name) for name, _ in KERNELS]
    assert kinds == [
        "GEMMs, full width",
        *["GEMMs, rank-sized (LoRA)"] * 3,
        *["attention"] * 4,
        "SwiGLU",
        "SwiGLU",
        "norms",
        "norms",
        "RoPE",
        "loss",
        "optimizer",
        "copies and fills",
        "other",
    ]


def test_a_gemm_is_told_by_its_ops_shapes_where_the_trace_has_them():
    """cuBLAS ran ftw's A grads (Σr × hidden outputs) on a 128 × 256 tile: their op's shapes say rank-sized."""
    tile = "nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopA_NTN"
    assert kind_of(tile) == "GEMMs, full width"
    assert kind_of(tile, [[48, 8192], [8192, 4096]]) == "GEMMs, rank-sized (LoRA)"
    assert kind_of(tile, [[8192, 4096], [8192, 4096], [4096, 4096], [], []]) == "GEMMs, full width"  # addmm
    assert kind_of("_rmsnorm_bwd", [[8192, 4096]]) == "norms"


def test_the_trace_links_each_kernel_to_the_op_that_launched_it(tmp_path):
    """Kernels carry their launching op's External id; the op's Input Dims classify them (record_shapes)."""
    tile = "nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopA_NTN"
    events = [
        {
            "cat": "cpu_op",
            "name": "aten::mm",
            "dur": 30,
            "args": {"External id": 1, "Input Dims": [[48, 8192], [8192, 4096]]},
        },
        {
            "cat": "cpu_op",
            "name": "aten::mm",
            "dur": 30,
            "args": {"External id": 2, "Input Dims": [[8192, 4096], [4096, 4096]]},
        },
        {"cat": "kernel", "name": tile, "dur": 27.5, "args": {"External id": 1}},
        {"cat": "kernel", "name": tile, "dur": 400.0, "args": {"External id": 2}},
        {"cat": "kernel", "name": tile, "dur": 100.0, "args": {"External id": 3}},  # no op recorded: by its tile
    ]
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    ms = split(str(path), steps=1)
    assert ms["GEMMs, rank-sized (LoRA)"] == pytest.approx(0.0275)
    assert ms["GEMMs, full width"] == pytest.approx(0.5)


@pytest.fixture
def trace(tmp_path):
    """Two steps' trace: every kernel twice, beside the CPU ops and runtime calls a real trace holds."""
    events = [{"cat": "cpu_op", "name": "aten::mm", "dur": 5000.0}, {"cat": "cuda_runtime", "name": "x", "dur": 4}]
    for _ in range(2):
        events += [{"cat": "kernel", "name": name, "dur": us} for name, us in KERNELS]
    events.append({"cat": "gpu_memset", "name": "Memset (Device)", "dur": 1.0})
    path = tmp_path / "prof.txt.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    return path


def test_a_trace_splits_into_ms_a_step_by_kind(trace):
    ms = split(str(trace), steps=2)
    assert ms["GEMMs, rank-sized (LoRA)"] == pytest.approx((39.6 + 27.3 + 2.4) / 1e3)
    assert ms["copies and fills"] == pytest.approx((41.3 + 0.5) / 1e3)  # the memset, once in two steps
    assert sum(ms.values()) == pytest.approx((sum(us for _, us in KERNELS) + 0.5) / 1e3)


def test_the_table_gives_each_arms_busy_time_and_energy(trace):
    done = subprocess.run(
        [sys.executable, "bench/step_split.py", f"a={trace}", f"b={trace}", "--steps", "2", "--watts", "a=500"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    busy = (sum(us for _, us in KERNELS) + 0.5) / 1e3
    assert f"| **GPU busy** | **{busy:.1f}** | **{busy:.1f}** |" in done.stdout
    assert f"| J a step (busy ms × mean W) | {busy * 500 / 1e3:.0f} |  |" in done.stdout  # b: no power given
