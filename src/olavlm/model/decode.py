"""One pass through the LLM's decoder on spliced embeddings, capturing the hidden states of chosen layers.

Layers are 1-based as in HF ``hidden_states``: layer ``l`` is the output of block ``l``, and
``n_layers`` is the final-norm output. Packed rows (several samples per row) run either as one
flattened row without a mask (flash-attention varlen, found from restarting position ids) or with
a block-diagonal mask (bool for sdpa, additive float for eager); ``packed_attention`` picks:
"auto" (flat for flash_attention_2, else the mask), "mask" or "position_ids".
"""

from __future__ import annotations

import functools

import torch

from olavlm.model import io
from olavlm.model.sequence import SequenceLayout


def _capture_hook(store: dict[int, torch.Tensor], layer: int, module, args, output) -> None:
    # first write wins: a recomputation (gradient checkpointing) must not replace the graph-carrying output
    store.setdefault(layer, output[0] if isinstance(output, tuple) else output)


def decode(llm, embeds: torch.Tensor, layout: SequenceLayout, layers: list[int], *, packed_attention: str = "auto"):
    """Final-norm states and {layer: states} captured by forward hooks at ``layers`` only."""
    decoder, blocks = io.decoder_of(llm)
    store: dict[int, torch.Tensor] = {}
    handles = [blocks[l - 1].register_forward_hook(functools.partial(_capture_hook, store, l))
               for l in layers if l < len(blocks)]
    mask, positions, flat = layout.attention_mask.long(), layout.position_ids, False
    if layout.packed:
        flat = packed_attention == "position_ids" or (
            packed_attention == "auto" and llm.config._attn_implementation == "flash_attention_2")
        if flat:  # one row, no mask: transformers finds the samples from the restarting position ids (varlen)
            embeds, positions, mask = embeds.reshape(1, -1, embeds.shape[-1]), positions.reshape(1, -1), None
        else:  # sdpa takes a bool mask (1 byte per entry); eager adds a float one
            impl = llm.config._attn_implementation
            mask = layout.block_attention_mask(torch.bool if impl == "sdpa" else embeds.dtype)
    try:
        out = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    hidden = out.last_hidden_state
    if flat:
        shape = (*layout.token_kind.shape, hidden.shape[-1])
        hidden = hidden.reshape(shape)
        store = {k: v.reshape(shape) for k, v in store.items()}
    if len(blocks) in layers:
        store[len(blocks)] = hidden  # hidden_states[n_layers] is the final-norm output, as in HF
    return hidden, store
