"""The *ForCausalLM training forward of the patched families (installed by kernels/ftw_kernels/patches.py): the loss
straight from the last hidden states through the fused linear cross-entropy, the full logits never built."""

from __future__ import annotations

import sys

import torch

from ftw_kernels.cross_entropy import fused_linear_cross_entropy, fused_linear_token_losses


def causal_lm_forward(
    self,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    inputs_embeds=None,
    labels=None,
    use_cache=None,
    logits_to_keep=0,
    **kwargs,
):
    """Forward with labels, in training and in evaluation: the loss straight from the last hidden states (no logits
    returned: an eval batch's tokens × vocabulary logits in fp32 would outgrow a checkpointed step's whole peak), plus
    the router's aux loss where an MoE model is asked for it. `token_losses=True`
    (the DPO family, worker/train/preference.py): `loss` is each token's loss instead,
    (batch × seq,) fp32, 0 where the shifted label is ignored, with no router aux loss in it. `target_rows`
    (cross_entropy.target_rows of the labels, a device copy of the host's): the mean loss's head takes only those
    rows of the hidden states; the loss and every grad are what all rows give.
    Without labels, or with a KV cache (generation), the original forward."""
    token_losses = kwargs.pop("token_losses", False)
    rows = kwargs.pop("target_rows", None)  # cross_entropy.target_rows of the labels, computed on the host
    inputs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        inputs_embeds=inputs_embeds,
    )
    if labels is None or past_key_values is not None:
        return self._ftw_original_forward(
            **inputs, labels=labels, use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs
        )
    from transformers.modeling_outputs import CausalLMOutputWithPast

    num_items = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    kwargs.pop("ignore_index", None)
    moe = hasattr(self, "router_aux_loss_coef")
    if moe:  # the MoE causal LMs' own argument, defaulting to their config
        router = kwargs.get("output_router_logits")
        kwargs["output_router_logits"] = self.config.output_router_logits if router is None else router
    outputs = self.model(**inputs, use_cache=False, **kwargs)
    hidden = outputs.last_hidden_state
    if shift_labels is None:  # HF's ForCausalLMLoss: token t predicts label t+1
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    targets = shift_labels.to(hidden.device)
    if token_losses:
        loss = fused_linear_token_losses(hidden, self.lm_head.weight, targets, -100)
    else:
        if rows is not None:  # the loss head over the rows that carry a loss only
            hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
            targets = targets.reshape(-1).index_select(0, rows)
        loss = fused_linear_cross_entropy(hidden, self.lm_head.weight, targets, -100, num_items)
    if moe and not token_losses:
        return _with_router_loss(self, loss, outputs, attention_mask, kwargs["output_router_logits"])
    return CausalLMOutputWithPast(
        loss=loss, logits=None, past_key_values=None, hidden_states=outputs.hidden_states, attentions=outputs.attentions
    )


def _with_router_loss(self, loss, outputs, attention_mask, router_logits: bool):
    """What the MoE causal LMs return: loss + coef × the load-balancing aux loss when router logits
    are asked for (the module's own `load_balancing_loss_func`, the model's attention mask)."""
    from transformers.modeling_outputs import MoeCausalLMOutputWithPast

    aux = None
    if router_logits:
        balance = sys.modules[type(self).__module__].load_balancing_loss_func
        aux = balance(outputs.router_logits, self.num_experts, self.num_experts_per_tok, attention_mask)
        loss = loss + self.router_aux_loss_coef * aux.to(loss.device)
    return MoeCausalLMOutputWithPast(
        loss=loss,
        aux_loss=aux,
        logits=None,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
        router_logits=outputs.router_logits,
    )


def plain_output_layer(head) -> bool:
    """A bias-free Linear, or PEFT's trainable copy of one (modules_to_save); a LoRA-wrapped head
    adds its own term to the logits, which the fused loss does not compute."""
    inner = getattr(head, "modules_to_save", None) if type(head).__name__ == "ModulesToSaveWrapper" else None
    layers = list(inner.values()) if inner is not None else [head]
    return all(type(m) is torch.nn.Linear and m.bias is None for m in layers)
