"""Llama model: components against float64 references, shape bookkeeping, FLOP count."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lpdist.models import PRESETS, Llama, LlamaConfig, SwiGLUMLP, count_parameters, flops_per_token, preset
from lpdist.models.llama import Attention, RMSNorm, RotaryEmbedding, apply_rotary

# float64 end to end: the only differences are summation order, far below 1e-10.
F64_TOL = 1e-10


def test_rmsnorm_matches_formula() -> None:
    torch.manual_seed(0)
    norm = RMSNorm(48, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 48, dtype=torch.float64)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected, atol=F64_TOL, rtol=F64_TOL)


def test_rotary_matches_complex_rotation_and_is_relative() -> None:
    head_dim, seq = 16, 12
    rope = RotaryEmbedding(head_dim, max_seq_len=seq, theta=10000.0).double()
    rope.reset_parameters()  # recompute the tables in float64
    cos, sin = rope(seq, torch.float64)
    x = torch.randn(2, 3, seq, head_dim, dtype=torch.float64)
    rotated = apply_rotary(x, cos, sin)
    # Reference: pair (x_i, x_{i+d/2}) as a complex number, multiply by e^{i pos theta_i}.
    half = head_dim // 2
    freqs = 10000.0 ** (-torch.arange(half, dtype=torch.float64) * 2 / head_dim)
    phase = torch.polar(torch.ones(seq, half, dtype=torch.float64), torch.arange(seq, dtype=torch.float64)[:, None] * freqs)
    z = torch.complex(x[..., :half], x[..., half:]) * phase
    torch.testing.assert_close(rotated, torch.cat([z.real, z.imag], dim=-1), atol=F64_TOL, rtol=F64_TOL)
    # <rot(q, m), rot(k, n)> depends on m - n only.
    q = torch.randn(head_dim, dtype=torch.float64).expand(1, 1, seq, head_dim)
    k = torch.randn(head_dim, dtype=torch.float64).expand(1, 1, seq, head_dim)
    rq, rk = apply_rotary(q, cos, sin)[0, 0], apply_rotary(k, cos, sin)[0, 0]
    assert math.isclose(float(rq[5] @ rk[2]), float(rq[9] @ rk[6]), rel_tol=1e-9)
    assert not math.isclose(float(rq[5] @ rk[2]), float(rq[5] @ rk[3]), rel_tol=1e-3)


def reference_attention(module: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Explicit causal softmax attention with K/V heads repeated for each query group."""
    batch, seq, _ = x.shape
    h, kv, hd = module.n_heads, module.n_kv_heads, module.head_dim
    q = (x @ module.q_proj.weight.T).view(batch, seq, h, hd).transpose(1, 2)
    k = (x @ module.k_proj.weight.T).view(batch, seq, kv, hd).transpose(1, 2)
    v = (x @ module.v_proj.weight.T).view(batch, seq, kv, hd).transpose(1, 2)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    k, v = k.repeat_interleave(h // kv, dim=1), v.repeat_interleave(h // kv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    future = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)
    weights = scores.masked_fill(future, float("-inf")).softmax(-1)
    return (weights @ v).transpose(1, 2).reshape(batch, seq, h * hd) @ module.o_proj.weight.T


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_grouped_query_attention_matches_reference(n_kv_heads: int) -> None:
    torch.manual_seed(1)
    config = LlamaConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=n_kv_heads, ffn_dim=64, vocab_size=16, max_seq_len=16)
    attention = Attention(config).double()
    rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta).double()
    rope.reset_parameters()
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    cos, sin = rope(10, torch.float64)
    torch.testing.assert_close(attention(x, cos, sin), reference_attention(attention, x, cos, sin), atol=F64_TOL, rtol=F64_TOL)


def test_swiglu_mlp_matches_formula() -> None:
    torch.manual_seed(2)
    mlp = SwiGLUMLP(24, 40).double()
    x = torch.randn(3, 24, dtype=torch.float64)
    gate, up = x @ mlp.gate_proj.weight.T, x @ mlp.up_proj.weight.T
    expected = (gate * torch.sigmoid(gate) * up) @ mlp.down_proj.weight.T
    torch.testing.assert_close(mlp(x), expected, atol=F64_TOL, rtol=F64_TOL)
    assert SwiGLUMLP.is_swiglu_mlp and mlp.smooth is None


def test_swiglu_mlp_routes_smoothing_through_lpdist_nn(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``smooth`` set, the forward is ``lpdist.nn.swiglu(x, gate, up, down, smooth=...)``."""
    calls = []

    def recording_swiglu(x, gate_proj, up_proj, down_proj, *, smooth):
        calls.append((gate_proj, up_proj, down_proj, smooth))
        return down_proj(F.silu(gate_proj(x)) * up_proj(x)) * 2

    fake_nn = types.ModuleType("lpdist.nn")
    fake_nn.swiglu = recording_swiglu
    monkeypatch.setitem(sys.modules, "lpdist.nn", fake_nn)
    mlp = SwiGLUMLP(8, 16)
    x = torch.randn(4, 8)
    plain = mlp(x)
    mlp.smooth = "channel"
    torch.testing.assert_close(mlp(x), plain * 2)
    assert calls == [(mlp.gate_proj, mlp.up_proj, mlp.down_proj, "channel")]


def test_model_is_causal_and_shapes() -> None:
    torch.manual_seed(3)
    model = Llama(preset("tiny")).double()
    tokens = torch.randint(0, 512, (2, 20))
    logits = model(tokens)
    assert logits.shape == (2, 20, 512)
    changed = tokens.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 512
    changed_logits = model(changed)
    torch.testing.assert_close(changed_logits[:, :12], logits[:, :12], atol=F64_TOL, rtol=F64_TOL)
    assert (changed_logits[:, 12:] - logits[:, 12:]).abs().max() > 1e-6


@pytest.mark.parametrize("tie", [False, True])
def test_count_parameters_matches_module(tie: bool) -> None:
    config = LlamaConfig(dim=48, n_layers=3, n_heads=6, n_kv_heads=2, ffn_dim=96, vocab_size=100, tie_embeddings=tie)
    model = Llama(config)
    assert count_parameters(config) == sum(p.numel() for p in model.parameters())
    lookup_only = [] if tie else [model.embed.weight]
    assert count_parameters(config, embedding=False) == sum(
        p.numel() for p in model.parameters() if all(p is not q for q in lookup_only)
    )


def test_one_billion_preset_matches_anchor_shape() -> None:
    config = PRESETS["1b"]
    assert (config.dim, config.n_layers, config.n_heads, config.n_kv_heads, config.ffn_dim, config.vocab_size) == (
        2048, 16, 32, 8, 8192, 32000,
    )
    assert 1.08e9 < count_parameters(config) < 1.12e9
    # The reference figure of about 7.4 GFLOP/token counts the embedding too: 6 * 65.5M = 0.39 GFLOP.
    embedding_flops = 6 * config.vocab_size * config.dim
    assert abs(flops_per_token(config, 2048) + embedding_flops - 7.4e9) < 0.05e9


def test_flops_per_token_matches_flop_counter() -> None:
    """FlopCounterMode counts every mm/bmm of forward+backward; the math SDPA backend
    materialises QK^T and PV for all positions, which is the non-causal convention."""
    config = preset("tiny")
    model = Llama(config)
    batch, seq = 2, 24
    tokens = torch.randint(0, config.vocab_size, (batch, seq))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens).sum().backward()
    assert counter.get_total_flops() == flops_per_token(config, seq) * batch * seq


def test_meta_construction_then_init_matches_eager() -> None:
    config = preset("tiny")
    eager = Llama(config)
    torch.manual_seed(4)
    eager.init_weights()
    with torch.device("meta"):
        lazy = Llama(config)
    lazy.to_empty(device="cpu")
    torch.manual_seed(4)
    lazy.init_weights()
    tokens = torch.randint(0, config.vocab_size, (2, 16))
    torch.testing.assert_close(lazy(tokens), eager(tokens))


def test_training_steps_reduce_loss() -> None:
    torch.manual_seed(5)
    model = Llama(preset("tiny"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, 512, (4, 33))
    losses = []
    for _ in range(15):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize(
    "change, message",
    [({"n_kv_heads": 3}, "multiple of n_kv_heads"), ({"dim": 66}, "divisible by n_heads"), ({"vocab_size": 0}, "vocab_size")],
)
def test_bad_config_is_rejected(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        preset("tiny", **change)
    with pytest.raises(ValueError, match="model preset"):
        preset("7b")


def test_sequence_longer_than_rope_table_is_rejected() -> None:
    model = Llama(preset("tiny", max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))
