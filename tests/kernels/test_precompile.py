"""Kernels recorded by a pass and compiled side by side (kernels/ftw_kernels/precompile.py), for real: the warm-up's
one-layer model with ftw's kernels, its pass recorded for an H100's target (sm_90) on this machine without a GPU,
its kernels compiled by Triton and ptxas in worker processes, and each then found in the cache by the compile that
the JIT runs at a kernel's first launch. In a child process: the suite runs Triton's interpreter, which has no JIT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
import json, sys
from pathlib import Path
import torch
from triton import knobs
from triton.backends.compiler import GPUTarget
from ftw_kernels import precompile
from schemas.config import TrainingConfig
from worker.train.batches import host_inputs
from worker.train.warmup import batches, build, passes
import broken_kernel

model_dir, cache = sys.argv[1], Path(sys.argv[2])
cfg = TrainingConfig.model_validate({
    "base_model": model_dir, "learning_rate": 1e-3, "adapter": "lora", "lora_r": 4, "lora_alpha": 8,
    "lora_target_linear": True, "sequence_len": 64, "micro_batch_size": 2, "sample_packing": True,
    "use_kernels": True, "bf16": True,
})
cpu = torch.device("cpu")
out = {}
with precompile.offline(GPUTarget("cuda", 90, 32)):
    model, tokenizer, precision, kernels = build(cfg, cpu)
    micro_batches = batches(cfg, tokenizer)
    for micro in micro_batches:
        micro.update(host_inputs(micro, "varlen_attention" in kernels, "fused_linear_cross_entropy" in kernels))
    x = torch.zeros(64)
    with precompile.recording() as recorded:
        passes(model, micro_batches, precision, cpu)  # the Offline driver cannot launch: none was
        broken_kernel.good[(1,)](x, 64, BLOCK=64)
        broken_kernel.broken[(1,)](x, 64, BLOCK=64)
    out["names"] = sorted({r.name for r in recorded})
    out["recorded"] = len(recorded)
    def jit_finds(cache_dir):  # the compile the JIT runs at each kernel's first launch: a cache hit, or a compile
        knobs.cache.dir = str(cache_dir)
        outcomes = [precompile.compile_one(r) for r in recorded if r.name != "broken"]
        assert not any(o.error for o in outcomes), outcomes
        return sum(o.cached for o in outcomes), len(outcomes)

    knobs.cache.dir = str(cache / "side-by-side")
    done = precompile.compile_side_by_side(recorded, 2)
    out["compiled"], out["failed"], out["workers"], out["cached"] = done.kernels, done.failed, done.workers, done.cached
    out["found_after"] = jit_finds(cache / "side-by-side")
    out["found_without"] = jit_finds(cache / "empty")
    out["cached_again"] = precompile.compile_side_by_side(recorded, 2).cached  # the cache of a used volume
    knobs.cache.dir = str(cache / "side-by-side")
    with precompile.counted() as first_launch:  # the JIT itself, at the pass's first kernel (nothing recorded now)
        try:
            passes(model, micro_batches[:1], precision, cpu)
        except AttributeError as e:  # the Offline driver cannot launch: the kernel was compiled (or read), then this
            out["launch"] = str(e)
    out["first_launch"] = first_launch
print(json.dumps(out))
"""

BROKEN = """
import triton
import triton.language as tl


@triton.jit
def good(X, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(X + offs, tl.load(X + offs, mask=offs < n) + 1, mask=offs < n)


@triton.jit
def broken(X, n, BLOCK: tl.constexpr):
    tl.static_assert(BLOCK < 0, "this kernel never compiles")
"""


@pytest.fixture(scope="module")
def offline_run(tiny_model_dir, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("precompile")
    (folder / "broken_kernel.py").write_text(BROKEN)
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": f"{folder}{os.pathsep}{os.environ['PYTHONPATH']}"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_model_dir), str(folder / "cache")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=Path(__file__).parents[2],
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_pass_records_its_kernels_without_launching_one(offline_run):
    # the layer's norms, rotary embedding, SwiGLU and the fused loss head: each kernel its pass would have compiled
    assert {"_rmsnorm_fwd", "_rmsnorm_bwd", "_rope", "_swiglu_fwd", "_ce_rows"} <= set(offline_run["names"])
    assert offline_run["recorded"] == offline_run["compiled"] >= 10  # each specialisation once, though launched twice


def test_what_compiles_side_by_side_is_what_the_jit_finds_at_first_launch(offline_run):
    found, asked = offline_run["found_after"]
    assert offline_run["workers"] == 2 and asked == offline_run["recorded"] - 1 and found == asked  # every one a hit
    assert offline_run["found_without"] == [0, asked]  # an empty cache: each would compile at its launch


def test_the_jits_own_compile_at_a_first_launch_reads_what_compiled_side_by_side(offline_run):
    assert offline_run["first_launch"] == {"compiled": 0, "from_cache": 1}  # one kernel, then the launch that cannot be
    assert "launcher" in offline_run["launch"]


def test_kernels_the_cache_holds_already_are_counted_as_such(offline_run):
    assert offline_run["cached"] == 0  # an empty cache: every kernel compiled
    assert offline_run["cached_again"] == offline_run["recorded"] - 1  # all but the one that never compiles


def test_a_kernel_that_does_not_compile_is_reported_and_the_rest_compile(offline_run):
    assert len(offline_run["failed"]) == 1 and offline_run["failed"][0].startswith("broken: ")
    assert "this kernel never compiles" in offline_run["failed"][0]
