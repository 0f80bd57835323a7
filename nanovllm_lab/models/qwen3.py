"""Qwen3 built from tensor-parallel layers.

Per-head q/k RMSNorm, grouped-query attention, RoPE, SiLU-gated MLP, pre-norm blocks with the residual add
fused into the norms, tied or untied LM head. The decoder-layer loop is delegated to the communication
strategy (`get_comm().run_layers`), which may interleave micro-batches.
"""
from __future__ import annotations

import torch
from torch import nn

from nanovllm_lab.comm import get_comm
from nanovllm_lab.distributed.parallel import tp_size
from nanovllm_lab.layers.activation import SiluAndMul
from nanovllm_lab.layers.attention import Attention
from nanovllm_lab.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from nanovllm_lab.layers.layernorm import RMSNorm
from nanovllm_lab.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from nanovllm_lab.layers.rotary_embedding import RotaryEmbedding
from nanovllm_lab.models.arch import ModelArch
from nanovllm_lab.utils.compile import compilable, use_triton


def qk_norm_rope_torch(qkv: torch.Tensor, positions: torch.Tensor, q_norm: RMSNorm, k_norm: RMSNorm,
                       rope: RotaryEmbedding, num_q: int, num_k: int, head_dim: int):
    """The attention prologue in PyTorch: split qkv, per-head q/k RMSNorm, RoPE -> q, k, v. Qwen3Attention's
    path where the fused kernel does not run, and that kernel's reference (kernels/qk_norm_rope.py)."""
    q, k, v = qkv.split([num_q * head_dim, num_k * head_dim, num_k * head_dim], -1)
    q = q_norm.norm(q.reshape(-1, num_q, head_dim))
    k = k_norm.norm(k.reshape(-1, num_k, head_dim))
    q, k = rope.rotate_qk(positions, q, k)
    return q, k, v


class Qwen3Attention(nn.Module):
    def __init__(self, a: ModelArch) -> None:
        super().__init__()
        tp = tp_size()
        self.num_heads, self.num_kv_heads = a.num_attention_heads // tp, a.num_key_value_heads // tp
        self.head_dim = a.head_dim
        self.q_size, self.kv_size = self.num_heads * a.head_dim, self.num_kv_heads * a.head_dim
        self.qkv_proj = QKVParallelLinear(a.hidden_size, a.head_dim, a.num_attention_heads,
                                          a.num_key_value_heads, bias=a.attention_bias)
        self.o_proj = RowParallelLinear(a.num_attention_heads * a.head_dim, a.hidden_size, bias=False)
        self.rotary_emb = RotaryEmbedding(a.head_dim, a.max_position_embeddings, a.rope_theta)
        self.attn = Attention(self.num_heads, a.head_dim, a.head_dim ** -0.5, self.num_kv_heads)
        self.q_norm = RMSNorm(a.head_dim, a.rms_norm_eps)
        self.k_norm = RMSNorm(a.head_dim, a.rms_norm_eps)  # the same eps as q's: the fused kernel takes one
        # The fused q/k kernel splits each head in two power-of-two halves; other head sizes take PyTorch.
        self.fused_qk = a.head_dim >= 2 and a.head_dim & (a.head_dim - 1) == 0

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        if self.fused_qk and use_triton(qkv):
            # One pass over q and k (kernels/qk_norm_rope.py), which also writes k and v into the KV cache where
            # the backend's layout allows; v stays a view of qkv for the prefill attention.
            from nanovllm_lab.kernels.qk_norm_rope import qk_norm_rope

            cache = self.attn.fused_store_target()
            q, k = qk_norm_rope(qkv, positions, self.rotary_emb.cos_sin, self.q_norm.weight, self.k_norm.weight,
                                self.q_norm.eps, self.num_heads, self.num_kv_heads, self.head_dim, cache=cache)
            v = qkv[:, self.q_size + self.kv_size:]
            return self.o_proj(self.attn(q, k, v, stored=cache is not None))
        q, k, v = self._qk_norm_rope(positions, qkv)
        return self.o_proj(self.attn(q, k, v))

    @compilable
    def _qk_norm_rope(self, positions: torch.Tensor, qkv: torch.Tensor):
        """Split, per-head q/k RMSNorm and RoPE as one compiled region: inductor fuses each of q and k into one
        kernel (norm + rotation), where separate regions for the two norms and RoPE launched four per layer
        (session 3's decode profile). Eager, it is the same operations in the same order."""
        return qk_norm_rope_torch(qkv, positions, self.q_norm, self.k_norm, self.rotary_emb, self.num_heads,
                                  self.num_kv_heads, self.head_dim)


class Qwen3MLP(nn.Module):
    def __init__(self, a: ModelArch) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(a.hidden_size, [a.intermediate_size] * 2, bias=False)
        self.down_proj = RowParallelLinear(a.intermediate_size, a.hidden_size, bias=False)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, a: ModelArch) -> None:
        super().__init__()
        self.self_attn = Qwen3Attention(a)
        self.mlp = Qwen3MLP(a)
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None):
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class Qwen3Model(nn.Module):
    def __init__(self, a: ModelArch) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(a) for _ in range(a.num_hidden_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        hidden, residual = get_comm().run_layers(self.layers, positions, hidden)
        if residual is None:  # the strategy's last reduction added it already (comm/base.py run_layers)
            return self.norm(hidden)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class Qwen3ForCausalLM(nn.Module):
    # checkpoint name fragment -> (our parameter fragment, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, a: ModelArch) -> None:
        super().__init__()
        self.arch = a
        self.model = Qwen3Model(a)
        self.lm_head = ParallelLMHead(a.vocab_size, a.hidden_size)
        if a.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.lm_head(hidden)


def checkpoint_shapes(a: ModelArch) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face Qwen3 checkpoint of this architecture holds, with its full shape."""
    h, d = a.hidden_size, a.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (a.vocab_size, h), "model.norm.weight": (h,)}
    if not a.tie_word_embeddings:
        shapes["lm_head.weight"] = (a.vocab_size, h)
    for i in range(a.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (a.num_attention_heads * d, h),
            p + "self_attn.k_proj.weight": (a.num_key_value_heads * d, h),
            p + "self_attn.v_proj.weight": (a.num_key_value_heads * d, h),
            p + "self_attn.o_proj.weight": (h, a.num_attention_heads * d),
            p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,),
            p + "mlp.gate_proj.weight": (a.intermediate_size, h), p + "mlp.up_proj.weight": (a.intermediate_size, h),
            p + "mlp.down_proj.weight": (h, a.intermediate_size),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    return shapes
