"""The train stage (`python -m worker.train`, worker/train/child.py): model, adapters, trainer, checkpoints."""

# What the train child imports only on a GPU, when it patches a model (the patched families' modeling code and
# ftw's kernels): a stage template (worker/job/template.py) imports them ahead, where they are installed.
# Strings only: importing this package loads nothing else.
LAZY_IMPORTS = (
    "transformers.models.llama.modeling_llama",
    "transformers.models.mistral.modeling_mistral",
    "transformers.models.qwen2.modeling_qwen2",
    "transformers.models.qwen3.modeling_qwen3",
    "ftw_kernels.patches",
)
