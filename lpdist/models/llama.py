"""Reference Llama decoder for pretraining experiments.

Architecture (Touvron et al. 2023, arXiv 2302.13971; Llama 3, arXiv 2407.21783):
pre-norm blocks ``x + Attn(RMSNorm(x))`` then ``x + MLP(RMSNorm(x))``, rotary position
embeddings (RoPE, Su et al. 2021, arXiv 2104.09864) on queries and keys, grouped-query
attention (Ainslie et al. 2023, arXiv 2305.13245) through ``F.scaled_dot_product_attention``,
and a SwiGLU feed-forward (Shazeer 2020, arXiv 2002.05202)::

    MLP(x) = down_proj( silu(gate_proj(x)) * up_proj(x) )

``SwiGLUMLP`` is the hook for Smooth-SwiGLU (Fishman et al. 2024, arXiv 2409.12517;
ALGORITHMS.md §2.3): ``lpdist.nn.convert`` finds it by its ``is_swiglu_mlp`` class
attribute and sets ``smooth`` to ``"token"`` or ``"channel"``; the forward then routes
through ``lpdist.nn.swiglu``, which is the same function in exact arithmetic.

Presets range from ``tiny`` (CPU tests in seconds) to ``8b`` (Llama-3-8B shapes). The
``1b`` preset is the ~1.1B Llama used as the end-to-end reference shape (d 2048, 16 layers,
32 heads / 8 KV heads, FFN 8192, vocabulary 32000). ``vocab_size`` is a config field:
the pretraining example replaces it with the tokenizer's vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LlamaConfig",
    "PRESETS",
    "preset",
    "RMSNorm",
    "RotaryEmbedding",
    "apply_rotary",
    "Attention",
    "SwiGLUMLP",
    "TransformerBlock",
    "Llama",
    "count_parameters",
    "flops_per_token",
]


@dataclass(frozen=True)
class LlamaConfig:
    """Shape of a Llama model.

    ``n_kv_heads`` < ``n_heads`` gives grouped-query attention (``n_heads`` must be a
    multiple of it). ``rope_theta`` is the RoPE base (10000 in Llama 2, 500000 in Llama 3).
    ``max_seq_len`` sizes the precomputed RoPE table.
    """

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int = 32000
    max_seq_len: int = 2048
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"LlamaConfig.{name} must be a positive finite number, got {value!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise TypeError(f"LlamaConfig.tie_embeddings must be a bool, got {self.tie_embeddings!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"LlamaConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"LlamaConfig.n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head dimension dim/n_heads must be even for RoPE, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def replace(self, **changes: object) -> "LlamaConfig":
        """A copy with the given fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, LlamaConfig] = {
    # A few hundred thousand parameters: CPU tests and smoke runs in seconds.
    "tiny": LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, vocab_size=512, max_seq_len=256),
    # ~19M parameters outside the embeddings: quick real runs with the byte-level tokenizer.
    "20m": LlamaConfig(dim=512, n_layers=6, n_heads=8, n_kv_heads=4, ffn_dim=1536, vocab_size=32000, max_seq_len=1024),
    # 125m .. 8b: the name is the total parameter count with the preset vocabulary.
    "125m": LlamaConfig(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=2048, vocab_size=32000),
    "350m": LlamaConfig(dim=1024, n_layers=24, n_heads=16, n_kv_heads=8, ffn_dim=2816, vocab_size=32000),
    # The end-to-end reference model: ~1.1B parameters with vocab 32000.
    "1b": LlamaConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, vocab_size=32000),
    # Llama-3.2-3B and Llama-3-8B shapes.
    "3b": LlamaConfig(
        dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim=8192, vocab_size=128256, max_seq_len=8192
    ),
    "8b": LlamaConfig(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=128256, max_seq_len=8192
    ),
}


def preset(name: str, **overrides: object) -> LlamaConfig:
    """The preset ``name`` (see ``PRESETS``) with ``overrides`` applied, e.g. ``vocab_size=``."""
    if name not in PRESETS:
        raise ValueError(f"model preset must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x^2) + eps) * weight`` (Zhang & Sennrich 2019), in fp32 or wider."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class RotaryEmbedding(nn.Module):
    """RoPE tables: each pair ``(x_i, x_{i+d/2})`` is rotated by ``pos * theta^(-2i/d)``.

    "Rotate half" pairing (as in the Hugging Face Llama); ``forward`` returns the cos/sin
    tables and ``apply_rotary`` rotates. The tables are non-persistent buffers, rebuilt by
    ``reset_parameters`` (e.g. after ``to_empty`` on a meta-device model).
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.theta = theta
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        device = self.cos.device
        if device.type == "meta":
            return
        inv_freq = self.theta ** (-torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=device) / self.head_dim)
        angles = torch.outer(torch.arange(self.max_seq_len, dtype=torch.float64, device=device), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())

    def forward(self, seq_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(cos, sin)`` tables for positions ``0..seq_len-1``, each [seq_len, head_dim]."""
        if seq_len > self.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds max_seq_len {self.max_seq_len}")
        return self.cos[:seq_len].to(dtype), self.sin[:seq_len].to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [batch, heads, seq, head_dim]: ``x * cos + rotate_half(x) * sin``."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class Attention(nn.Module):
    """Causal grouped-query attention: ``n_heads`` query heads share ``n_kv_heads`` K/V heads."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.dim, config.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * self.head_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        q = self.q_proj(x).view(batch, seq_len, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_heads != self.n_kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq_len, -1))


class SwiGLUMLP(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``.

    ``lpdist.nn.convert`` recognises this class by ``is_swiglu_mlp`` and may set
    ``smooth`` to ``"token"`` or ``"channel"``; the forward then calls
    ``lpdist.nn.swiglu(x, gate_proj, up_proj, down_proj, smooth=...)`` (Smooth-SwiGLU,
    arXiv 2409.12517; ALGORITHMS.md §2.3), equal to this function in exact arithmetic.
    """

    is_swiglu_mlp = True

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.smooth: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        from lpdist.nn import swiglu

        return swiglu(x, self.gate_proj, self.up_proj, self.down_proj, smooth=self.smooth)


class TransformerBlock(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x))``; ``out = h + mlp(norm(h))``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = SwiGLUMLP(config.dim, config.ffn_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attn(self.attn_norm(x), cos, sin)
        return h + self.mlp(self.mlp_norm(h))


class Llama(nn.Module):
    """Decoder-only Llama: ``forward(tokens [B, T] int64) -> logits [B, T, vocab]``.

    Initialisation (``init_weights``): N(0, 0.02) for embeddings and linears, with the
    residual-branch outputs (``o_proj``, ``down_proj``) scaled by ``1/sqrt(2 * n_layers)``
    (GPT-2, Radford et al. 2019), and ones for the norms. Call ``init_weights`` after
    materialising a meta-device model with ``to_empty``.
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        std = 0.02
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        self.rope.reset_parameters()
        nn.init.normal_(self.embed.weight, std=std)
        for block in self.layers:
            block.attn_norm.reset_parameters()
            block.mlp_norm.reset_parameters()
            for linear in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj, block.mlp.gate_proj, block.mlp.up_proj):
                nn.init.normal_(linear.weight, std=std)
            for linear in (block.attn.o_proj, block.mlp.down_proj):
                nn.init.normal_(linear.weight, std=residual_std)
        self.norm.reset_parameters()
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must have shape [batch, seq] with seq >= 1, got {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"tokens must be int64 or int32 token ids, got {tokens.dtype}")
        # Range check where it is free (CPU ids). On a GPU it would cost a host sync every forward;
        # there lpdist.data checks ids against the vocabulary once, when a token file is loaded.
        if tokens.numel() and tokens.device.type == "cpu" and not torch.compiler.is_compiling():
            low, high = (int(v) for v in torch.aminmax(tokens))
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(f"tokens must be ids in [0, {self.config.vocab_size}), got values in [{low}, {high}]")
        h = self.embed(tokens)
        cos, sin = self.rope(tokens.shape[1], h.dtype)
        for block in self.layers:
            h = block(h, cos, sin)
        return self.lm_head(self.norm(h))


def _linear_parameters(config: LlamaConfig) -> int:
    """Weights of every matmul in the model: attention and MLP projections plus the head."""
    d, hd = config.dim, config.head_dim
    attention = d * config.n_heads * hd * 2 + d * config.n_kv_heads * hd * 2
    mlp = 3 * d * config.ffn_dim
    return config.n_layers * (attention + mlp) + config.vocab_size * d


def count_parameters(config: LlamaConfig, *, embedding: bool = True) -> int:
    """Number of parameters of ``Llama(config)``, from the shapes alone.

    ``embedding=False`` leaves out the input embedding table (a lookup, not a matmul); the
    output head is counted either way (it is the embedding table when tied).
    """
    norms = (2 * config.n_layers + 1) * config.dim
    untied_embedding = 0 if config.tie_embeddings else config.vocab_size * config.dim
    return _linear_parameters(config) + norms + (untied_embedding if embedding else 0)


def flops_per_token(config: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), the convention used for MFU.

    ``6 * N + 12 * n_layers * dim * seq_len`` (Kaplan et al. 2020 §2.1; Chowdhery et al.
    2022, PaLM App. B) with N the matmul weights (projections and output head; not the
    embedding lookup or the norms). The attention term counts QK^T and PV as if not causal,
    as PaLM and torchtitan do. The reference figure of "about 7.4 GFLOP per token" for the 1b
    preset at sequence 2048 (behind its bf16 MFU of about 66% on one H200) also counts the
    embedding table in N; this gives 7.04.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    return 6.0 * _linear_parameters(config) + 12.0 * config.n_layers * config.dim * seq_len
