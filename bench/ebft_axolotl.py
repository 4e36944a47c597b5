"""The axolotl arm of bench/ebft.py: axolotl 0.18.0's strided EBFT trainer (AxolotlStridedEBFTTrainer.compute_loss,
from its wheel) on the model, settings and documents of ftw's arms, in its own process.

    PYTHONPATH=SITE python bench/ebft_axolotl.py --shape llama-1b --doc-lens 1024,2048   # a JSON row per line

SITE holds what axolotl's trainer imports beyond the GPU image and ftw's wheels (`pip install --no-deps
--target SITE` of axolotl 0.18.0, addict, trl 1.8.0 — the version axolotl pins; trl 1.15's lacks
trl.experimental.prm, which axolotl.core.training_args imports — and pillow, for axolotl's multimodal
config schema). bench/ebft.py starts this with --axolotl-site SITE; the step is ftw's arm's (documents of seed
i, the loss, backward, AdamW at the same learning rate), the loss axolotl's trainer's own.

numba: axolotl.core.trainers' package __init__ imports its multipack sampler, which imports numba (and numba
llvmlite: 60 MB of wheels, more than the device tool carries beside ftw's). Strided EBFT never packs, so where
numba is missing a stand-in whose njit returns the function unchanged is registered, and each row says so
(`numba: stand-in`); where numba is installed it is used.

The model is bf16 on the CPU too (ftw's CPU arm is fp32): axolotl's feature pass builds its dense mask in bf16,
which sdpa refuses beside fp32 queries. CPU (--cpu, the dry run): axolotl's trainer assumes a GPU for its
feature network (one visible GPU: the actor's weights with the adapter disabled, on cuda:0; none: a copy moved
to cuda:0). Here it is built as on one GPU and its feature device set to the CPU, the state it has on one GPU.
On a GPU nothing is changed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import types
from pathlib import Path
from typing import Any
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels")]
from bench.ebft import EBFT, LEARNING_RATE, build, documents, measure  # noqa: E402


def numba_stand_in() -> str:
    """'installed', or 'stand-in' after registering a numba whose njit/jit leave functions as they are."""
    if importlib.util.find_spec("numba") is not None:
        return "installed"

    def jit(*fn: Any, **_: Any) -> Any:
        return fn[0] if fn and callable(fn[0]) else (lambda f: f)

    sys.modules["numba"] = types.SimpleNamespace(njit=jit, jit=jit, prange=range)  # type: ignore[assignment]
    return "stand-in"


def trainer_for(model: Any, docs: int, device: Any, folder: str) -> Any:
    """axolotl's strided EBFT trainer with ftw's arm's settings (schemas' EbftConfig, the keys both share)."""
    import torch
    from axolotl.core.trainers.ebft.args import AxolotlStridedEBFTConfig
    from axolotl.core.trainers.ebft.strided import AxolotlStridedEBFTTrainer

    from schemas.rl import EbftConfig

    ebft = EbftConfig(**EBFT)
    settings = {
        f"ebft_{key}": getattr(ebft, key)
        for key in (
            "stride context_length generate_max_len n_samples_per_prompt temperature top_p feature_layers "
            "embed_method use_whitening alignment_coef ce_coef rl_coef min_completion_prefix"
        ).split()
    }
    settings |= {"ebft_diversity_coef": ebft.diversity(None), "ebft_advantage_estimator": ebft.estimator(None)}
    args = AxolotlStridedEBFTConfig(
        output_dir=folder,
        per_device_train_batch_size=docs,
        learning_rate=LEARNING_RATE,
        logging_steps=1,
        report_to="none",
        bf16=device.type == "cuda",
        use_cpu=device.type == "cpu",
        **settings,
    )
    if device.type == "cuda":
        return AxolotlStridedEBFTTrainer(model=model, args=args, train_dataset=[])
    with mock.patch.object(torch.cuda, "device_count", return_value=1):  # its one-GPU construction
        trainer = AxolotlStridedEBFTTrainer(model=model, args=args, train_dataset=[])
    trainer._feature_device = device
    return trainer


def settings_of(trainer: Any) -> dict[str, Any]:
    """What axolotl's trainer runs with after its own checks (written beside each row, compared with ftw's)."""
    names = (
        "stride context_length generate_max_len n_samples temperature top_p embed_method use_whitening "
        "alignment_coef diversity_coef rl_coef ce_coef advantage_estimator min_completion_prefix"
    ).split()
    return {
        **{name: getattr(trainer, f"ebft_{name}") for name in names},
        "feature_layers": trainer.feature_layer_indices,
        "flex_attention": bool(trainer.use_flex_attention),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-1b")
    parser.add_argument("--doc-lens", default="1024,2048,4096")
    parser.add_argument("--docs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cpu", action="store_true", help="the dry run on the CPU")
    args = parser.parse_args(argv)
    numba = numba_stand_in()
    import torch
    from axolotl import __version__

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    lengths = [int(x) for x in args.doc_lens.split(",")]
    model = build(args.shape, device, max(lengths) * 2, dtype=torch.bfloat16)  # axolotl's masks are bf16
    with tempfile.TemporaryDirectory() as folder:
        trainer = trainer_for(model, args.docs, device, folder)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
        for doc_len in lengths:

            def step(i: int, doc_len: int = doc_len) -> None:
                loss = trainer.compute_loss(model, documents(model.config.vocab_size, args.docs, doc_len, i, device))
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            row = measure("axolotl", doc_len, step, device, args)
            row |= {"axolotl": __version__, "numba": numba, "settings": settings_of(trainer)}
            print(json.dumps(row), flush=True)  # bench/ebft.py reads the rows of the lengths finished
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
