"""Attention processor that LSQ-quantizes the attention matmul operands.

With ``activation.attention_matmul`` on, q, k, the softmax probabilities and v
are fake-quantized before the two matmuls (probabilities unsigned, the rest
signed). Being an ``nn.Module``, diffusers registers the processor as a child of
its ``Attention``, so the quantizers' steps land in the state dict.
"""

from __future__ import annotations

import torch
from torch import nn

from binarydm.quant.lsq import LSQQuantizer


class QuantAttnProcessor(nn.Module):
    """diffusers attention processor with quantized q/k/probs/v (self-attention of UNet2DModel)."""

    def __init__(self, bits: int, *, stage: int) -> None:
        super().__init__()
        self.query_quantizer = LSQQuantizer(bits)
        self.key_quantizer = LSQQuantizer(bits)
        self.value_quantizer = LSQQuantizer(bits)
        self.probs_quantizer = LSQQuantizer(bits, signed=False)
        self.stage = stage
        self.active = True

    def _q(self, quantizer: LSQQuantizer, x: torch.Tensor) -> torch.Tensor:
        return quantizer(x) if self.active else x

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        *args,
        **kwargs,
    ):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, seq_len, _ = context.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)

        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        query = self._q(self.query_quantizer, query)
        key = self._q(self.key_quantizer, key)
        probs = attn.get_attention_scores(query, key, attention_mask)
        probs = self._q(self.probs_quantizer, probs)
        value = self._q(self.value_quantizer, value)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
