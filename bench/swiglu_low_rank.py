"""Gate's and up's LoRA terms added inside the SwiGLU kernels instead of by the GEMMs: would it pay?

ftw's fused MLP writes s·(x·Aᵀ)·Bᵀ first and lets each base GEMM add itself to it (cuBLAS's beta), which
bench/stacked_gemms.py measured at 12% (8B) and 21% (1B) over the gate and up GEMMs alone. The alternative
tried here: the GEMMs write x·Wᵀ alone and the SwiGLU kernels take g = g_base + s·(x·Aᵀ)·Bᵀ inside each tile
(a rank-sized dot per tile from L2-resident operands), forward and again in the backward (g and u are saved
without their terms). A rank-sized dot needs a 2-D tile (rows × columns); ftw's kernels run flat 1-D blocks.
Arms, per shape: ftw's flat kernels (kernels/ftw_kernels/swiglu.py, no terms); the 2-D kernels below without
terms; the 2-D kernels with both terms, the dot on fp32 operands (`tf32`: bf16 values are exact in tf32), on
the bf16 operands as loaded (`native`), or as 16 outer products on the CUDA cores (`fma`); per tile shape
and warp count. The kernels are memory-bound: GB/s is the bytes they must move over their time (the H200's
HBM3e peak is ~4,800). Found on an H200 (docs/benchmarks.md): no tile brings the 2-D kernels to the flat
ones' speed, and the terms inside cost nearly what they save in the GEMMs (net ~0.3% of a step): ftw keeps
the GEMMs' beta.

    python3 bench/swiglu_low_rank.py --shapes llama-8b,llama-1b      # on a GPU (~100 s)
    python3 bench/swiglu_low_rank.py --shapes tiny                    # the harness on CPU (TRITON_INTERPRET=1)

Times: bench/gpu_bench.py's `timed_us` (the GPU's time alone, the median of 30 after 5)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels")]
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from bench.gpu_bench import SHAPES, setup, timed_us  # noqa: E402
from ftw_kernels import swiglu  # noqa: E402

TILES = [(32, 256, 4), (32, 256, 8), (64, 128, 4), (64, 128, 8), (16, 256, 4), (32, 128, 4)]  # rows, cols, warps
METHODS = ["tf32", "native", "fma"]
RANK, SCALE = 16, 2.0


@triton.jit
def _with_term(x, rows, cols, n_rows, n_cols, XA, xa_stride, B, scale, R: tl.constexpr, METHOD: tl.constexpr):
    """x + scale·XA[rows]·B[cols]ᵀ, fp32."""
    if METHOD == "fma":
        acc = tl.zeros_like(x)
        for k in tl.static_range(R):
            a = tl.load(XA + rows.to(tl.int64) * xa_stride + k, mask=rows < n_rows, other=0.0).to(tl.float32)
            b = tl.load(B + cols.to(tl.int64) * R + k, mask=cols < n_cols, other=0.0).to(tl.float32)
            acc += a[:, None] * b[None, :]
        return x + scale * acc
    r = tl.arange(0, R)
    xa = tl.load(XA + rows[:, None].to(tl.int64) * xa_stride + r[None, :], mask=rows[:, None] < n_rows, other=0.0)
    b = tl.load(B + cols[:, None].to(tl.int64) * R + r[None, :], mask=cols[:, None] < n_cols, other=0.0)
    if METHOD == "native":
        return x + scale * tl.dot(xa, b.T)
    return x + scale * tl.dot(xa.to(tl.float32), b.T.to(tl.float32), input_precision="tf32")


@triton.jit
def _gate_up(G, U, XA, xa_stride, BG, BU, n_rows, n_cols, scale, TERMS: tl.constexpr, R: tl.constexpr,
             METHOD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    if TERMS:
        g = _with_term(g, rows, cols, n_rows, n_cols, XA, xa_stride, BG, scale, R, METHOD)
        u = _with_term(u, rows, cols, n_rows, n_cols, XA + R, xa_stride, BU, scale, R, METHOD)
    return offs, mask, g, u


@triton.jit
def _forward(G, U, H, XA, xa_stride, BG, BU, n_rows, n_cols, scale, TERMS: tl.constexpr, R: tl.constexpr,
             METHOD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    offs, mask, g, u = _gate_up(G, U, XA, xa_stride, BG, BU, n_rows, n_cols, scale, TERMS, R, METHOD, BLOCK_M, BLOCK_N)
    tl.store(H + offs, (g * tl.sigmoid(g) * u).to(H.dtype.element_ty), mask=mask)


@triton.jit
def _backward(DH, G, U, DG, DU, H, XA, xa_stride, BG, BU, n_rows, n_cols, scale, TERMS: tl.constexpr,
              R: tl.constexpr, METHOD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """dg, du and h: the bytes ftw's fused MLP backward moves (it writes them over g, u and dh; here they go
    to buffers of their own, so every repeat reads the same inputs)."""
    offs, mask, g, u = _gate_up(G, U, XA, xa_stride, BG, BU, n_rows, n_cols, scale, TERMS, R, METHOD, BLOCK_M, BLOCK_N)
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(DG + offs, (dh * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dh * silu).to(DU.dtype.element_ty), mask=mask)
    tl.store(H + offs, (silu * u).to(H.dtype.element_ty), mask=mask)


def launch(kernel, tensors, xa, bg, bu, terms: bool, method: str, tile) -> None:
    n_rows, n_cols = tensors[1].shape
    block_m, block_n, warps = tile
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n))
    kernel[grid](*tensors, xa, xa.stride(0), bg, bu, n_rows, n_cols, SCALE, TERMS=terms, R=RANK, METHOD=method,
                 BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)  # fmt: skip


def check(device: torch.device, dtype: torch.dtype, method: str) -> float:
    """Relative error of the 2-D forward with terms against the same sum in float64 (a tiny shape)."""
    g, u = (torch.randn(70, 300, device=device, dtype=dtype) for _ in range(2))
    xa = torch.randn(70, 2 * RANK, device=device, dtype=dtype)
    bg, bu = (torch.randn(300, RANK, device=device, dtype=dtype) / RANK**0.5 for _ in range(2))
    h = torch.empty_like(g)
    launch(_forward, [g, u, h], xa, bg, bu, True, method, TILES[0])
    full = [
        t.double() + SCALE * xa[:, i * RANK : (i + 1) * RANK].double() @ b.double().t()
        for i, (t, b) in enumerate([(g, bg), (u, bu)])
    ]
    ref = torch.nn.functional.silu(full[0]) * full[1]
    return ((h.double() - ref).norm() / ref.norm()).item()


def rows_for(shape: str, device: torch.device, dtype: torch.dtype) -> list[tuple[str, str, str, float, float]]:
    """(tile, method, terms, fwd µs, bwd µs) of each arm."""
    tokens, _, inter, _ = SHAPES[shape]
    g, u, dh = (torch.randn(tokens, inter, device=device, dtype=dtype) for _ in range(3))
    xa = torch.randn(tokens, 2 * RANK, device=device, dtype=dtype)
    bg, bu = (torch.randn(inter, RANK, device=device, dtype=dtype) / RANK**0.5 for _ in range(2))
    dg, du = torch.empty_like(g), torch.empty_like(u)
    flat_dh = dh.clone()  # ftw's backward writes h over it (h does not depend on dh: the repeats read alike)
    out = [("flat 1-D (ftw)", "-", "none",
            timed_us(lambda: swiglu.swiglu_forward_raw(g, u), device),
            timed_us(lambda: swiglu.swiglu_backward(flat_dh, g, u, dg, du, True), device))]  # fmt: skip
    on_gpu = device.type == "cuda"
    arms = [(False, "tf32"), *((True, method) for method in (METHODS if on_gpu else ["tf32", "fma"]))]
    h = torch.empty_like(g)
    for tile in TILES if on_gpu else TILES[:1]:
        for terms, method in arms:
            fwd = timed_us(lambda: launch(_forward, [g, u, h], xa, bg, bu, terms, method, tile), device)  # noqa: B023
            bwd = timed_us(lambda: launch(_backward, [dh, g, u, dg, du, h], xa, bg, bu, terms, method, tile), device)  # noqa: B023
            label = f"{tile[0]} × {tile[1]}, {tile[2]} warps"
            out.append((label, method if terms else "-", "gate's and up's" if terms else "none", fwd, bwd))
    return out


def main() -> None:
    args, device, dtype = setup(__doc__)
    for method in METHODS if device.type == "cuda" else ["tf32", "fma"]:
        print(f"the 2-D forward with terms, {method}: relative error {check(device, dtype, method):.1e}")
    print("| shape | kernel (tile) | dot | LoRA terms | fwd µs | fwd GB/s | bwd µs | bwd GB/s |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for shape in args.shapes:
        tokens, _, inter, _ = SHAPES[shape]
        size = tokens * inter * dtype.itemsize
        for label, method, terms, fwd, bwd in rows_for(shape, device, dtype):
            # forward: reads g, u, writes h; backward: reads dh, g, u, writes dg, du, h
            print(f"| {shape} | {label} | {method} | {terms} | {fwd:.1f} | {3 * size / fwd / 1e3:.0f} | {bwd:.1f} "
                  f"| {6 * size / bwd / 1e3:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
