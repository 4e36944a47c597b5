"""Strided EBFT's block-parallel layout: where each block's rollout lives in one sequence, and who attends to whom.

One document of S tokens and its n rollouts run as n rows of one sequence of S + B·G tokens: the
document, then block b's G generated tokens at S + b·G … S + b·G + G − 1 (block-major, so a query
tile of the flex kernel touches few blocks' contexts). Block b's anchor is a_b = first + b·stride:
its tokens stand for document positions a_b … a_b + G − 1 (their position ids), and it may see

- the document before its anchor (tokens < a_b), and
- its own earlier generated tokens (and itself),

never another block's generated tokens; document tokens attend causally among themselves. The same
rule (`allowed`) is the flex_attention mask_mod on a GPU (a BlockMask: memory linear in the
sequence) and the dense (1, 1, L, L) mask of the CPU fallback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from schemas.rl import EbftConfig


@dataclass(frozen=True)
class StridedLayout:
    doc_len: int  # S
    first: int  # the first anchor
    stride: int
    gen_len: int  # G
    blocks: int  # B

    @classmethod
    def for_document(cls, doc_len: int, prompt_len: int, ebft: EbftConfig) -> StridedLayout | None:
        """Anchors from max(prompt + min_completion_prefix, context_length) while a block fits (None: none)."""
        first = max(prompt_len + ebft.min_completion_prefix if prompt_len else 0, ebft.context_length)
        blocks = (doc_len - ebft.generate_max_len - first) // ebft.stride + 1
        if blocks <= 0:
            return None
        return cls(doc_len, first, ebft.stride, ebft.generate_max_len, blocks)

    @property
    def total(self) -> int:
        return self.doc_len + self.blocks * self.gen_len

    def anchors(self, device: torch.device | None = None) -> torch.Tensor:
        return self.first + self.stride * torch.arange(self.blocks, device=device)

    def ground_truth(self, device: torch.device | None = None) -> torch.Tensor:
        """(B, G): document positions of each block's ground-truth continuation."""
        return self.anchors(device)[:, None] + torch.arange(self.gen_len, device=device)

    def generated(self, device: torch.device | None = None) -> torch.Tensor:
        """(B, G): sequence positions of each block's generated tokens."""
        return self.doc_len + torch.arange(self.blocks * self.gen_len, device=device).view(self.blocks, self.gen_len)

    def predictors(self, device: torch.device | None = None) -> torch.Tensor:
        """(B, G): the position whose logits predict each generated token (the anchor's previous, then the last)."""
        gen = self.generated(device)
        return torch.cat([self.anchors(device)[:, None] - 1, gen[:, :-1]], 1)

    def position_ids(self, device: torch.device | None = None) -> torch.Tensor:
        """(L,): 0 … S − 1 for the document, a_b + t for block b's t-th token."""
        return torch.cat([torch.arange(self.doc_len, device=device), self.ground_truth(device).reshape(-1)])

    def allowed(self, q: Any, kv: Any) -> Any:
        return allowed(q, kv, self.doc_len, self.first, self.stride, self.gen_len)


def allowed(q: Any, kv: Any, doc: Any, first: Any, stride: Any, gen: Any) -> Any:
    """May query position q attend to key position kv? (tensor ops only: it is also flex's mask_mod)."""
    q_gen, kv_gen = q >= doc, kv >= doc
    q_block, kv_block = (q - doc) // gen, (kv - doc) // gen
    causal = kv <= q
    in_document = ~q_gen & causal
    context = q_gen & ~kv_gen & (kv < first + q_block * stride)
    own_block = q_gen & kv_gen & (q_block == kv_block) & causal
    return in_document | context | own_block


def dense_mask(layout: StridedLayout, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(1, 1, L, L): bool (True = attend), or additive in `dtype` (0 / min) for eager attention."""
    idx = torch.arange(layout.total, device=device)
    ok = layout.allowed(idx[:, None], idx[None, :])[None, None]
    if dtype is None:
        return ok
    return torch.zeros(ok.shape, dtype=dtype, device=device).masked_fill(~ok, torch.finfo(dtype).min)


def block_mask(layout: StridedLayout, device: torch.device) -> Any:
    """flex_attention's BlockMask of the same rule (broadcast over rows and heads). The layout's numbers
    are captured as tensors, so a new document length does not recompile the kernel for a new constant."""
    from torch.nn.attention.flex_attention import create_block_mask

    doc, first, stride, gen = (
        torch.tensor(v, device=device) for v in (layout.doc_len, layout.first, layout.stride, layout.gen_len)
    )

    def mask_mod(b: Any, h: Any, q: Any, kv: Any) -> Any:
        return allowed(q, kv, doc, first, stride, gen)

    return create_block_mask(mask_mod, None, None, layout.total, layout.total, device=device)


def sample(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row of (…, V) logits: softmax(logits / temperature), nucleus-filtered to top_p."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # keep the smallest prefix reaching top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat / flat.sum(-1, keepdim=True), 1).view(probs.shape[:-1])
