"""The trainer loop's objective for rl: ebft, mode strided (one GPU, no vLLM; one item = one document).

Per document of the micro-batch (worker/train/ebft_blocks.py has the layout and the mask):
1. generate: n rows of the document + B empty blocks; G forwards of the policy (adapter on, eval
   mode, no grad), each filling token t of every block at once from the logits of its predictor.
2. features: one forward of the frozen model (the adapter disabled; a frozen copy for full
   fine-tuning) over the filled sequence with the same mask: each block's generated tokens and its
   ground-truth continuation in the document, pooled per block, optionally whitened across the n rollouts.
3. rewards (eq. 7) and advantages per block over its n rollouts (worker/train/ebft.py).
4. loss: one forward of the policy with grad: GRPO's policy loss (worker/train/grpo.py; one pass
   per generation, so REINFORCE: −A·log π per generated token, averaged over them) × rl_coef, plus
   ce_coef × the cross-entropy of the document's trained tokens (those positions attend causally, so
   they are the plain model's next-token predictions).
In evaluation the loss is that cross-entropy (the held-out CE of the ground truth), and the CFM is
logged as a metric. Logits are computed only where they are used, a chunk at a time (recomputed in
the backward), so memory stays linear in the document's length.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from schemas.config import TrainingConfig
from schemas.rl import EbftConfig, TrlConfig
from worker.errors import TrainingError
from worker.train import ebft
from worker.train.batches import IGNORE
from worker.train.ebft_blocks import StridedLayout, block_mask, dense_mask, sample
from worker.train.grpo import policy_loss

LOGIT_CHUNK = 1024  # positions per lm_head chunk
REINFORCE = TrlConfig(loss_type="bnpo")  # ratio 1 (one pass per generation): the clip never bites


def body_and_head(model: Any) -> tuple[Any, Any]:
    """The decoder stack and the lm_head of a causal LM (PEFT-wrapped or not)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix), base.get_output_embeddings()


def attention_path(device: torch.device) -> str:
    """flex on a GPU (a BlockMask: linear memory), dense on the CPU; FTW_EBFT_ATTENTION=dense|flex overrides it
    (bench/ebft.py compares the two)."""
    forced = os.environ.get("FTW_EBFT_ATTENTION")
    if forced in ("dense", "flex"):
        return forced
    return "flex" if device.type == "cuda" else "dense"


@contextmanager
def attention_implementation(model: Any, name: str | None) -> Iterator[None]:
    """The model's attention backend set to `name` for the block (None: unchanged)."""
    if name is None:
        yield
        return
    config = model.config
    saved = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = saved


def token_logps(head: Any, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log π(target) at each (…, P) position from hidden (…, P, H), LOGIT_CHUNK positions at a time;
    with grad, each chunk's logits are recomputed in the backward instead of kept."""

    def chunk(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(head(h).float(), -1).gather(-1, t[..., None])[..., 0]

    parts = []
    for i in range(0, hidden.shape[-2], LOGIT_CHUNK):
        h, t = hidden[..., i : i + LOGIT_CHUNK, :], targets[..., i : i + LOGIT_CHUNK]
        parts.append(checkpoint(chunk, h, t, use_reentrant=False) if torch.is_grad_enabled() else chunk(h, t))
    return torch.cat(parts, -1)


def prompt_length(labels: torch.Tensor) -> int:
    """Tokens before the first trained label; 0 when the document is trained from its start (the
    first token never is: it has no context)."""
    trained = (labels != IGNORE).nonzero()
    first = int(trained[0]) if len(trained) else int(labels.shape[0])
    return 0 if first <= 1 else first


class StridedEbftObjective:
    target_rows = False  # its losses are its own, not the fused mean loss over target rows
    metric_names = (
        *ebft.REWARD_METRICS,
        "ebft/ce_loss",
        "ebft/rl_loss",
        "ebft/num_blocks",
        "ebft/advantages_std",
    )
    plotted = ("ebft/cfm_loss",)  # beside the loss in loss.png (whose eval loss is the held-out CE)

    def __init__(self, cfg: TrainingConfig, model: Any, tokenizer: Any):
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # its forwards call the decoder stack directly (to chunk the lm_head): a DDP/FSDP wrapper would not sync
            raise TrainingError(
                "rl: ebft with ebft.mode: strided runs on one GPU, and this job has "
                f"{torch.distributed.get_world_size()} processes",
                hint="run it on one GPU (CUDA_VISIBLE_DEVICES or a one-GPU endpoint), or use ebft.mode: structured",
            )
        self.cfg, self.model = cfg, model
        self.ebft = cfg.ebft or EbftConfig(mode="strided")
        self.samples = self.ebft.n_samples_per_prompt
        self.estimator, self.diversity = self.ebft.estimator(None), self.ebft.diversity(None)
        self.layers = ebft.layer_indices(self.ebft.feature_layers, model.config.num_hidden_layers)
        # LoRA: the base with the adapter disabled; full fine-tuning: a frozen copy of the starting weights
        self.frozen = None if hasattr(model, "disable_adapter") else copy.deepcopy(model).eval().requires_grad_(False)
        self.path = attention_path(next(model.parameters()).device)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["input_ids"].shape[0])

    # ---- one document ----------------------------------------------------------------------------
    def mask(self, layout: StridedLayout, device: torch.device) -> tuple[Any, str | None]:
        """The attention mask of the layout and the attention backend that reads it."""
        if self.path == "flex":
            return block_mask(layout, device), "flex_attention"
        if self.model.config._attn_implementation != "eager":
            return dense_mask(layout, device), None
        autocast = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if autocast else next(self.model.parameters()).dtype
        return dense_mask(layout, device, dtype), None

    def forward(
        self,
        model: Any,
        ids: torch.Tensor,
        mask: Any,
        backend: str | None,
        positions: torch.Tensor,
        **kw: Any,
    ) -> Any:
        body, _ = body_and_head(model)
        with attention_implementation(body, backend):
            return body(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **kw)

    @torch.no_grad()
    def generate(self, seq: torch.Tensor, layout: StridedLayout, mask: Any, backend: str | None) -> torch.Tensor:
        """Fill the blocks of `seq` (n × L), token t of every block per forward."""
        _, head = body_and_head(self.model)
        positions = layout.position_ids(seq.device)[None].expand_as(seq)
        predictors, generated = layout.predictors(seq.device), layout.generated(seq.device)
        was_training = self.model.training
        self.model.eval()
        try:
            for t in range(layout.gen_len):
                hidden = self.forward(self.model, seq, mask, backend, positions).last_hidden_state
                logits = head(hidden[:, predictors[:, t]])
                seq[:, generated[:, t]] = sample(logits, self.ebft.temperature, self.ebft.top_p)
        finally:
            self.model.train(was_training)
        return seq

    @torch.no_grad()
    def block_features(
        self, seq: torch.Tensor, layout: StridedLayout, mask: Any, backend: str | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(gen (B, n, D), gt (B, D)): pooled features of each block's rollouts and of its ground truth."""
        model = self.frozen if self.frozen is not None else self.model
        disabled = self.model.disable_adapter() if self.frozen is None else nullcontext()
        positions = layout.position_ids(seq.device)[None].expand_as(seq)
        was_training = model.training
        model.eval()
        try:
            with disabled:
                out = self.forward(model, seq, mask, backend, positions, output_hidden_states=True)
        finally:
            model.train(was_training)
        feats = ebft.features(out.hidden_states, self.layers)  # n × L × D
        del out
        ones = torch.ones(layout.blocks, layout.gen_len, dtype=torch.bool, device=seq.device)
        gen = ebft.pool(feats[:, layout.generated(seq.device)], self.ebft.embed_method, ones, ones)
        gt = ebft.pool(feats[0, layout.ground_truth(seq.device)], self.ebft.embed_method, ones, ones)
        return gen.transpose(0, 1), gt

    def document(self, doc: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(loss, metric values) of one document, or None when no block fits in it."""
        layout = StridedLayout.for_document(int(doc.shape[0]), prompt_length(labels), self.ebft)
        if layout is None:
            return None
        device, n = doc.device, self.samples
        mask, backend = self.mask(layout, device)
        seq = torch.cat([doc, doc.new_zeros(layout.blocks * layout.gen_len)]).repeat(n, 1)
        seq = self.generate(seq, layout, mask, backend)
        gen, gt = self.block_features(seq, layout, mask, backend)
        if self.ebft.use_whitening:
            gen, gt = ebft.whiten(gen, gt)
        scored = ebft.rewards(gen, gt, self.ebft.alignment_coef, self.diversity)
        adv = ebft.advantages(scored.reward, self.estimator).transpose(0, 1)  # n × B
        hidden = self.forward(
            self.model, seq, mask, backend, layout.position_ids(device)[None].expand_as(seq)
        ).last_hidden_state
        _, head = body_and_head(self.model)
        predictors = layout.predictors(device).reshape(-1)
        logp = token_logps(head, hidden[:, predictors], seq[:, layout.doc_len :])  # n × B·G
        per_token = adv.repeat_interleave(layout.gen_len, 1).to(logp.dtype)
        rl, _ = policy_loss(logp, logp.detach(), None, per_token, torch.ones_like(logp), REINFORCE, 0.0)
        trained = (labels[1:] != IGNORE).nonzero()[:, 0]
        ce = -token_logps(head, hidden[0, trained], doc[1:][trained]).mean() if len(trained) else rl * 0
        training = self.model.training
        loss = self.ebft.rl_coef * rl + self.ebft.ce_coef * ce if training else ce
        stats = torch.stack(
            [
                *scored.means(),
                ce.detach().float(),
                rl.detach().float(),
                torch.tensor(float(layout.blocks), device=device),
                adv.std() if adv.numel() > 1 else torch.zeros((), device=device),
            ]
        )
        return loss, stats.double()

    # ---- the objective contract --------------------------------------------------------------------
    def loss(
        self, engine: Any, batch: dict[str, torch.Tensor], n_items: torch.Tensor | float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ids, labels = batch["input_ids"], batch["labels"]
        lengths = batch["attention_mask"].sum(1).tolist() if "attention_mask" in batch else [ids.shape[1]] * len(ids)
        grad: Callable[[], Any] = torch.no_grad if not self.model.training else nullcontext
        total = ids.new_zeros((), dtype=torch.float32)
        sums = torch.zeros(len(self.metric_names), dtype=torch.float64, device=ids.device)
        with grad():
            for row, n in enumerate(lengths):
                out = self.document(ids[row, : int(n)], labels[row, : int(n)])
                if out is not None:
                    total, sums = total + out[0], sums + out[1]
        if not total.requires_grad and self.model.training:  # no block fitted anywhere: a zero loss with a graph
            total = total + sum(p.sum() * 0 for p in self.model.parameters() if p.requires_grad)
        return total / n_items, sums

    def metrics(self, sums: list[float], n_items: float) -> dict[str, float]:
        return {name: value / max(n_items, 1) for name, value in zip(self.metric_names, sums)}

    def close(self) -> None:
        """Nothing to stop: strided mode generates inside its own forward passes."""
