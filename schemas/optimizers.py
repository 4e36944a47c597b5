"""Every optimizer ftw builds, by its axolotl name: the one registry that validation
(`schemas/rules.py`), the machine checks (`worker/checks/machine.py`) and the builder
(`worker/train/optim.py`, which dispatches on the family) all read.

A name here validates, is checked against the machine for what its spec requires, and is built;
a name in NOT_SHIPPED is a real transformers/axolotl optimizer that ftw does not build, refused at
validation as unsupported (not as a typo). No torch here: the orchestrator reads this too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

# the builder that makes it: a torch.optim class, torch's Muon (2-D weights only), a class of
# transformers.optimization, of bitsandbytes.optim or of torchao.optim
Family = Literal["torch", "muon", "transformers", "bitsandbytes", "torchao"]


@dataclass(frozen=True)
class OptimizerSpec:
    family: Family
    class_name: str  # the class in its family's module
    adam: bool = False  # takes the config's adam_beta1/adam_beta2/adam_epsilon
    fused_on_cuda: bool = False  # torch's fused kernel where the device is a CUDA GPU
    fixed: Mapping[str, object] = field(default_factory=dict)  # keyword arguments ftw always passes
    needs_cuda: bool = False
    packages: tuple[str, ...] = ()  # import names the worker must have installed
    moment_bits: int | None = None  # bits a moment value takes when kept quantised (None: the parameter's own)

    def requirement(self) -> str:
        """What the machine must have, in words ("bitsandbytes on a CUDA GPU")."""
        return " and ".join(self.packages or ("torch",)) + (" on a CUDA GPU" if self.needs_cuda else "")


def _bnb(class_name: str, adam: bool = True, moment_bits: int | None = 8) -> OptimizerSpec:
    return OptimizerSpec(
        "bitsandbytes", class_name, adam=adam, needs_cuda=True, packages=("bitsandbytes",), moment_bits=moment_bits
    )


def _torchao(class_name: str, moment_bits: int) -> OptimizerSpec:
    """torchao's low-bit AdamW: states kept in 8 or 4 bits (block-wise scales) or float8; its step is
    compiled with torch.compile on first use, on CPU too."""
    return OptimizerSpec("torchao", class_name, adam=True, packages=("torchao",), moment_bits=moment_bits)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw_torch": OptimizerSpec("torch", "AdamW", adam=True),
    "adamw_torch_fused": OptimizerSpec("torch", "AdamW", adam=True, fused_on_cuda=True),
    "adamw_bnb_8bit": _bnb("AdamW8bit"),
    "adamw_8bit": _bnb("AdamW8bit"),
    "paged_adamw_8bit": _bnb("PagedAdamW8bit"),
    "paged_adamw_32bit": _bnb("PagedAdamW32bit", moment_bits=None),
    "adamw_hf": OptimizerSpec("torch", "AdamW", adam=True),  # transformers' own AdamW is gone: torch's
    "adafactor": OptimizerSpec(
        "transformers",
        "Adafactor",
        fixed={"scale_parameter": False, "relative_step": False, "warmup_init": False},
    ),
    "sgd": OptimizerSpec("torch", "SGD"),
    "adagrad": OptimizerSpec("torch", "Adagrad"),
    "lion_8bit": _bnb("Lion8bit", adam=False),
    "paged_lion_8bit": _bnb("PagedLion8bit", adam=False),
    "rmsprop": OptimizerSpec("torch", "RMSprop"),
    "adamw_torch_8bit": _torchao("AdamW8bit", 8),  # transformers' names for torchao's
    "adamw_torch_4bit": _torchao("AdamW4bit", 4),
    "ao_adamw_8bit": _torchao("AdamW8bit", 8),  # axolotl's names for the same
    "ao_adamw_4bit": _torchao("AdamW4bit", 4),
    "ao_adamw_fp8": _torchao("AdamWFp8", 8),
    "muon": OptimizerSpec("muon", "Muon"),
}

# in transformers or axolotl, not built by ftw
NOT_SHIPPED = frozenset(
    (
        "adamw_torch_xla adamw_torch_npu_fused adamw_anyprecision ademamix ademamix_8bit lion_32bit "
        "paged_ademamix_32bit paged_ademamix_8bit paged_lion_32bit rmsprop_bnb rmsprop_bnb_8bit rmsprop_bnb_32bit "
        "galore_adamw galore_adamw_8bit galore_adafactor galore_adamw_layerwise galore_adamw_8bit_layerwise "
        "galore_adafactor_layerwise lomo adalomo grokadamw schedule_free_radam schedule_free_adamw schedule_free_sgd "
        "apollo_adamw apollo_adamw_layerwise stable_adamw optimi_adamw "
        "adopt_adamw came_pytorch dion sinkgd flash_adamw flash_adam flash_sgd flash_sgdw flash_lion q_galore_adamw8bit"
    ).split()
)
