"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) over flattened tokens and a paged KV cache.
Every Linear comes from the quantization layer; q/k/v and gate/up are merged projections."""
from __future__ import annotations

import torch
from torch import nn

from quantkit.config import ModelConfig
from quantkit.layers.activation import SiluAndMul
from quantkit.layers.attention import Attention, AttentionBackend, AttentionMetadata
from quantkit.layers.embed_head import VocabEmbedding
from quantkit.layers.linear import Linear
from quantkit.layers.norm import RMSNorm
from quantkit.layers.rotary import RotaryEmbedding
from quantkit.quant.base import QuantConfig
from quantkit.quant.w8a8 import QuantizedActivation


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype, quant_config: QuantConfig | None,
                 backend: AttentionBackend, rotary: RotaryEmbedding, prefix: str) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, [q_size, kv_size, kv_size], cfg.qkv_bias, dtype, quant_config,
                               f"{prefix}.qkv_proj", ["q_proj", "k_proj", "v_proj"])
        self.o_proj = Linear(q_size, [cfg.hidden_size], cfg.o_bias, dtype, quant_config, f"{prefix}.o_proj")
        self.rotary = rotary
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads, cfg.sliding_windows[layer_idx],
                              backend)
        self.split = [q_size, kv_size, kv_size]

    def forward(self, positions: torch.Tensor, x: torch.Tensor | QuantizedActivation,
                meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        out = self.attn(q, k, v.view(-1, self.num_kv_heads, self.head_dim), meta)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, quant_config: QuantConfig | None, prefix: str) -> None:
        super().__init__()
        inter = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, [inter, inter], cfg.mlp_bias, dtype, quant_config,
                                   f"{prefix}.gate_up_proj", ["gate_proj", "up_proj"])
        self.down_proj = Linear(inter, [cfg.hidden_size], cfg.mlp_bias, dtype, quant_config, f"{prefix}.down_proj")
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        quant = self.down_proj.quant_method.input_quant_for(gate_up.numel() // gate_up.shape[-1], gate_up.dtype)
        return self.down_proj(self.act(gate_up, quant))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype, quant_config: QuantConfig | None,
                 backend: AttentionBackend, rotary: RotaryEmbedding) -> None:
        super().__init__()
        prefix = f"model.layers.{layer_idx}"
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(cfg, layer_idx, dtype, quant_config, backend, rotary, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = LlamaMLP(cfg, dtype, quant_config, f"{prefix}.mlp")

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        # A norm whose next Linear takes pre-quantized activations emits them (fused), skipping the Linear's pass.
        tokens = x.numel() // x.shape[-1]
        qkv_quant = self.self_attn.qkv_proj.quant_method.input_quant_for(tokens, x.dtype)
        if residual is None:
            residual = x
            x = self.input_layernorm(x, quant=qkv_quant)
        else:
            x, residual = self.input_layernorm(x, residual, qkv_quant)
        x = self.self_attn(positions, x, meta)
        gate_up_quant = self.mlp.gate_up_proj.quant_method.input_quant_for(tokens, x.dtype)
        x, residual = self.post_attention_layernorm(x, residual, gate_up_quant)
        return self.mlp(x), residual

    def fold_input_permutations(self) -> None:
        """Act-order layers (GPTQ desc_act) read their input columns permuted; the op before each writes them in
        that order, so no gather runs per call: the norms before qkv and gate_up, attention (storing each output
        column where o_proj reads it) and gate_up's own output columns for down (SiLU-and-mul is elementwise, so
        it keeps the order)."""
        self.input_layernorm.out_perm = self.self_attn.qkv_proj.take_input_permutation()
        self.self_attn.attn.write_output_in(self.self_attn.o_proj.take_input_permutation())
        self.post_attention_layernorm.out_perm = self.mlp.gate_up_proj.take_input_permutation()
        down = self.mlp.down_proj
        perm = down.quant_method.input_permutation(down)
        if perm is not None and self.mlp.gate_up_proj.permute_outputs(torch.cat([perm, perm + down.input_size]).long()):
            down.quant_method.drop_input_permutation(down)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, quant_config: QuantConfig | None,
                 backend: AttentionBackend) -> None:
        super().__init__()
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope)
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i, dtype, quant_config, backend, rotary)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    """forward(input_ids [T], positions [T], meta) -> hidden [T, hidden]; compute_logits(hidden [R, hidden]) ->
    fp32 logits [R, vocab] for only the rows that are sampled."""
    # Checkpoint module name -> (our merged module, shard index).
    packed_modules = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                      "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
    # Checkpoint tensors that carry nothing we need.
    ignored_suffixes = ("rotary_emb.inv_freq",)

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, quant_config: QuantConfig | None,
                 backend: AttentionBackend) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, dtype, quant_config, backend)
        self.lm_head = Linear(cfg.hidden_size, [cfg.vocab_size], False, dtype, quant_config, "lm_head")
        if cfg.tie_word_embeddings:
            if not hasattr(self.lm_head, "weight"):
                raise ValueError("tie_word_embeddings with a quantized lm_head is not supported")
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
