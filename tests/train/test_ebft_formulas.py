"""EBFT's formulas against plain-PyTorch references on tiny tensors (loops over samples, blocks and
tokens as the paper writes them), and the strided block mask checked exhaustively on small sizes."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from schemas.rl import EbftConfig, TrlConfig
from worker.train import ebft
from worker.train.ebft_blocks import StridedLayout, dense_mask, sample
from worker.train.grpo import policy_loss


def test_rewards_and_cfm_follow_eq_7():
    torch.manual_seed(0)
    gen, gt = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    got = ebft.rewards(gen, gt, alignment_coef=0.7, diversity_coef=0.3)
    for b in range(3):
        mean = sum(gen[b, j] for j in range(4)) / 4
        assert math.isclose(got.cfm[b], float(((mean - gt[b]) ** 2).sum()), rel_tol=1e-9)
        for j in range(4):
            cos = float(gen[b, j] @ gt[b] / (gen[b, j].norm() * gt[b].norm()))
            div = sum(float(gen[b, j] @ gen[b, k]) for k in range(4) if k != j) / 3
            assert math.isclose(got.alignment[b, j], 2 * cos, rel_tol=1e-9)
            assert math.isclose(got.diversity[b, j], 2 * div, rel_tol=1e-9)
            assert math.isclose(got.reward[b, j], 0.7 * 2 * cos - 0.3 * 2 * div, rel_tol=1e-9)
    one = ebft.rewards(gen[:, :1], gt, 1.0, 1.0)
    assert torch.equal(one.diversity, torch.zeros_like(one.diversity))


@pytest.mark.parametrize("n, d", [(4, 6), (3, 2)])
def test_whitening_is_the_inverse_square_root_of_the_samples_second_moment(n, d):
    torch.manual_seed(1)
    gen, gt = torch.randn(2, n, d, dtype=torch.float64), torch.randn(2, d, dtype=torch.float64)
    white_gen, white_gt = ebft.whiten(gen, gt)
    for b in range(2):
        second = gen[b].T @ gen[b]  # D × D, rank min(n, d)
        values, vectors = torch.linalg.eigh(second)
        keep = values > (1e-5 * values.max().sqrt()) ** 2
        w = sum(vectors[:, i : i + 1] @ vectors[:, i : i + 1].T / values[i].sqrt() for i in range(d) if keep[i])
        assert torch.allclose(white_gen[b].double(), gen[b] @ w, atol=1e-5)
        assert torch.allclose(white_gt[b].double(), gt[b] @ w, atol=1e-5)


def test_advantage_estimators():
    r = torch.tensor([[1.0, 2.0, 4.0, 9.0], [0.5, 0.5, 0.5, 1.5]])
    rloo = ebft.advantages(r, "rloo")
    norm = ebft.advantages(r, "group_norm")
    for g in range(2):
        row = r[g].tolist()
        mean = sum(row) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in row) / 3)
        for j in range(4):
            others = [row[k] for k in range(4) if k != j]
            assert math.isclose(rloo[g, j], row[j] - sum(others) / 3, rel_tol=1e-6)
            assert math.isclose(norm[g, j], (row[j] - mean) / (std + 1e-4), rel_tol=1e-5)
    assert torch.equal(ebft.advantages(r, "reinforce"), r)
    assert torch.equal(ebft.advantages(r[:, :1], "rloo"), r[:, :1])  # one sample: no baseline to leave out


def test_pooling_methods():
    torch.manual_seed(2)
    feats = torch.randn(2, 8, 3)
    mask = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])
    completion = torch.tensor([[0] * 3 + [1] * 5, [0] * 2 + [1] * 6])
    for i, n in enumerate((8, 6)):
        rows = [feats[i, t] for t in range(n)]
        comp = [feats[i, t] for t in range(n) if completion[i, t]]
        want = {
            "last_token": rows[-1],
            "mean_pooling": sum(rows) / n,
            "completion_mean": sum(comp) / len(comp),
            "concat": torch.cat([rows[n // 4], rows[n // 2], rows[3 * n // 4]]),
        }
        for method, expected in want.items():
            assert torch.allclose(ebft.pool(feats, method, mask, completion)[i], expected, atol=1e-6), method


def test_features_normalise_each_layer_then_concatenate():
    hidden = tuple(torch.randn(2, 3, 4) * (k + 1) for k in range(5))
    assert ebft.layer_indices([0.25, 0.5, 1.0], 4) == [1, 2, 4]
    got = ebft.features(hidden, [1, 4])
    for layer, part in zip((1, 4), got.split(4, -1)):
        assert torch.allclose(part, hidden[layer] / hidden[layer].norm(dim=-1, keepdim=True), atol=1e-6)


def test_policy_loss_with_per_token_advantages_is_reinforce():
    torch.manual_seed(3)
    logp = torch.randn(3, 6, requires_grad=True)
    adv = torch.randn(3, 6)
    loss, _ = policy_loss(logp, logp.detach(), None, adv, torch.ones(3, 6), TrlConfig(loss_type="bnpo"), 0.0)
    (g,) = torch.autograd.grad(loss, logp)
    reinforce = -sum(adv[i, t] * logp[i, t] for i in range(3) for t in range(6)) / 18  # −mean A·log π
    (want,) = torch.autograd.grad(reinforce, logp)
    assert torch.allclose(g, want) and torch.allclose(loss, -adv.mean())  # ρ = 1 in value: the surrogate is −mean A


def reference_allowed(layout: StridedLayout) -> list[list[bool]]:
    """The rule written per token: what each token is (document i, or block b's t-th generated token)."""
    kinds = [("doc", i, None) for i in range(layout.doc_len)]
    kinds += [("gen", b, t) for b in range(layout.blocks) for t in range(layout.gen_len)]
    out = []
    for qk, qa, qt in kinds:
        row = []
        for kk, ka, kt in kinds:
            if qk == "doc":
                ok = kk == "doc" and ka <= qa
            elif kk == "doc":
                ok = ka < layout.first + qa * layout.stride  # the document before the block's anchor
            else:
                ok = ka == qa and kt <= qt  # its own earlier tokens; never another block's
            row.append(ok)
        out.append(row)
    return out


LAYOUTS = [
    StridedLayout.for_document(s, p, EbftConfig(mode="strided", stride=st, context_length=c, generate_max_len=g))
    for s, p, st, c, g in itertools.product((6, 9, 13), (0, 4), (1, 2, 3), (1, 3), (1, 2, 3))
]


@pytest.mark.parametrize("layout", [x for x in LAYOUTS if x is not None], ids=str)
def test_block_mask_exhaustively(layout):
    from torch.nn.attention.flex_attention import create_mask

    want = torch.tensor(reference_allowed(layout))
    dense = dense_mask(layout, torch.device("cpu"))[0, 0]
    assert torch.equal(dense, want)
    additive = dense_mask(layout, torch.device("cpu"), torch.float32)[0, 0]
    assert torch.equal(additive == 0, want)

    def mask_mod(b, h, q, kv):  # flex's mask_mod is the same rule; create_mask evaluates it on the CPU
        return layout.allowed(q, kv)

    assert torch.equal(create_mask(mask_mod, 1, 1, layout.total, layout.total, device="cpu")[0, 0], want)
    doc = layout.doc_len
    for q in range(doc, layout.total):  # no token attends to another block's generated tokens
        others = [k for k in range(doc, layout.total) if (k - doc) // layout.gen_len != (q - doc) // layout.gen_len]
        assert not dense[q, others].any()


def test_layout_positions_and_predictors():
    layout = StridedLayout.for_document(
        20, 6, EbftConfig(mode="strided", stride=4, context_length=3, generate_max_len=3, min_completion_prefix=2)
    )
    assert (layout.first, layout.blocks) == (8, 3)  # anchors 8, 12, 16; 16 + 3 ≤ 20
    assert layout.position_ids().tolist() == list(range(20)) + [8, 9, 10, 12, 13, 14, 16, 17, 18]
    assert layout.predictors().tolist() == [[7, 20, 21], [11, 23, 24], [15, 26, 27]]
    assert StridedLayout.for_document(10, 6, EbftConfig(mode="strided", min_completion_prefix=2)) is None


def test_dense_mask_forward_is_each_block_run_alone(tmp_path):
    """The mask and positions make a block's tokens see exactly the document before its anchor and
    their own block: their logits equal a plain causal forward of prefix + that block alone."""
    from transformers import AutoModelForCausalLM

    from worker.devtools.tiny import build_model

    model = AutoModelForCausalLM.from_pretrained(build_model(tmp_path / "m", layers=2), attn_implementation="sdpa")
    layout = StridedLayout.for_document(
        17, 0, EbftConfig(mode="strided", stride=3, context_length=4, generate_max_len=3)
    )
    torch.manual_seed(4)
    seq = torch.randint(5, 200, (1, layout.total))
    with torch.no_grad():
        logits = model(
            input_ids=seq,
            attention_mask=dense_mask(layout, torch.device("cpu")),
            position_ids=layout.position_ids()[None],
        ).logits
        for b, anchor in enumerate(layout.anchors().tolist()):
            block = layout.generated()[b]
            alone = torch.cat([seq[0, :anchor], seq[0, block]])[None]
            ref = model(input_ids=alone).logits
            assert torch.allclose(logits[0, block], ref[0, anchor:], atol=1e-4)
        assert torch.allclose(
            logits[0, : layout.doc_len], model(input_ids=seq[:, : layout.doc_len]).logits[0], atol=1e-4
        )


def test_sampling_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(2000, 4)
    torch.manual_seed(5)
    drawn = sample(logits, 1.0, 0.7)  # 0.5 + 0.3 reach 0.7: only tokens 0 and 1
    assert set(drawn.tolist()) == {0, 1}
    share = (drawn == 0).float().mean()
    assert abs(share - 0.5 / 0.8) < 0.05
    assert set(sample(logits, 1.0, 1.0).tolist()) == {0, 1, 2, 3}


def test_flex_block_mask_and_dense_mask_give_the_same_evaluation(task_model_dir):
    """The GPU path (flex_attention with the BlockMask) and the CPU path (dense mask) agree on a whole
    document's generation, features, rewards and CE (flex runs forward-only on the CPU)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from schemas.config import TrainingConfig
    from worker.train.ebft_strided import StridedEbftObjective

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(task_model_dir), LoraConfig(r=8, target_modules="all-linear")
    )
    model.eval()
    cfg = TrainingConfig(
        base_model=str(task_model_dir),
        learning_rate=1e-3,
        rl="ebft",
        adapter="lora",
        datasets=[{"path": "x.jsonl", "type": "ebft_pretrain.transform"}],
        ebft={"mode": "strided", "stride": 4, "context_length": 4, "generate_max_len": 4, "n_samples_per_prompt": 3},
    )
    torch.manual_seed(6)
    ids = torch.randint(5, 300, (1, 40))
    labels = ids.clone()
    labels[:, 0] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    results = []
    for path in ("dense", "flex"):
        objective = StridedEbftObjective(cfg, model, None)
        objective.path = path
        torch.manual_seed(0)
        with torch.no_grad():
            loss, sums = objective.loss(model, batch, torch.tensor(1.0))
        results.append((loss, sums))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-4)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-4)
