"""Recipes and convert(): expected swaps on the reference Llama, and every recipe trains."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lpdist.models.llama import Llama, LlamaConfig
from lpdist.nn import Float8Linear, FP4Linear, Recipe, convert, recipes

CFG = dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256, vocab_size=128, max_seq_len=32)
PER_BLOCK = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _model(seed: int) -> Llama:
    torch.manual_seed(seed)
    return Llama(LlamaConfig(**CFG))


def test_expected_swaps_and_state_dict_unchanged():
    model = _model(0)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    summary = convert(model, "fp8-smooth")
    expected = [f"layers.{i}.{p}" for i in range(2) for p in PER_BLOCK]
    assert summary.converted == expected
    assert all(isinstance(model.get_submodule(n), Float8Linear) for n in expected)
    assert type(model.lm_head) is nn.Linear and isinstance(model.embed, nn.Embedding)
    assert "lm_head" in summary.kept
    assert summary.smoothed == ["layers.0.mlp", "layers.1.mlp"]
    assert all(model.get_submodule(f"layers.{i}.mlp").smooth == "token" for i in range(2))
    sd = model.state_dict()
    assert list(sd) == list(keys) and all(torch.equal(sd[k], keys[k]) for k in keys)
    assert "14 linear layer(s) -> Float8Linear" in str(summary)


def test_selection_options():
    model = _model(1)
    summary = convert(model, Recipe("mine", linear="fp4", fp4_recipe="dge",
                                    keep_high_precision=("q_proj", "layers.1.*")),
                      filter_fn=lambda name, m: "k_proj" not in name)
    assert summary.converted == [f"layers.0.{p}" for p in PER_BLOCK if p not in ("attn.q_proj", "attn.k_proj")]
    assert isinstance(model.layers[0].mlp.down_proj, FP4Linear)
    assert summary.kept["layers.0.attn.k_proj"] == "filter_fn"
    nv = convert(_model(2), "nvfp4")
    assert len(nv.converted) == 11 and nv.converted[-1] == "layers.1.attn.o_proj"
    assert convert(_model(3), "bf16").num_converted == 0


def test_bad_recipes():
    with pytest.raises(ValueError, match="recipe"):
        convert(_model(4), "fp6")
    with pytest.raises(ValueError, match="fp4_recipe"):
        Recipe("x", linear="fp4")
    with pytest.raises(ValueError, match="smooth_swiglu"):
        Recipe("x", smooth_swiglu="row")
    with pytest.raises(TypeError, match="model"):
        convert("model", "fp8")


@pytest.mark.parametrize("name", sorted(recipes))
def test_tiny_model_trains_with_every_recipe(name):
    """Loss on a fixed batch falls with every recipe (20 AdamW steps)."""
    model = _model(5)
    convert(model, name)
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, CFG["vocab_size"], (2, 33), generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("recipe", ["fp8", "fp4-dge"])
def test_a_bare_linear_is_refused_and_left_unchanged(recipe):
    """convert() swaps submodules in place; it cannot replace the model object itself."""
    lin = nn.Linear(64, 64)
    keys = list(lin.state_dict())
    with pytest.raises(ValueError, match="from_linear"):
        convert(lin, recipe)
    assert type(lin) is nn.Linear and not dict(lin.named_children()) and list(lin.state_dict()) == keys


def test_a_layer_under_two_names_is_swapped_under_both():
    torch.manual_seed(6)
    shared, other = nn.Linear(64, 64), nn.Linear(64, 64)
    model = nn.Module()
    model.a, model.b, model.c = shared, shared, other
    summary = convert(model, "fp8")
    assert isinstance(model.a, Float8Linear) and model.a is model.b and model.a.weight is shared.weight
    assert isinstance(model.c, Float8Linear) and summary.converted == ["a", "b", "c"]
    # a layer shared through a parent module: both paths reach the same new layer
    block = nn.Sequential(nn.Linear(64, 64))
    stack = nn.Sequential(block, block)
    assert convert(stack, "fp8").converted == ["0.0", "1.0"]
    assert isinstance(stack[0][0], Float8Linear) and stack[0][0] is stack[1][0]


def test_a_layer_kept_under_one_name_is_kept_under_all():
    """The output head tied to another name stays high precision everywhere (one layer, one
    precision), and the keep_last_fraction count sees it once."""
    head = nn.Linear(64, 64)
    model = nn.Module()
    model.proj, model.lm_head = head, head
    summary = convert(model, "fp8")
    assert type(model.proj) is nn.Linear and model.proj is model.lm_head
    assert summary.converted == [] and set(summary.kept) == {"proj", "lm_head"}
    tail = nn.Module()
    tail.first, tail.second = nn.Linear(64, 64), nn.Linear(64, 64)
    tail.again = tail.second
    summary = convert(tail, Recipe("half", linear="fp8", keep_last_fraction=0.5))
    assert summary.converted == ["first"] and set(summary.kept) == {"second", "again"}
    assert type(tail.second) is nn.Linear and tail.again is tail.second


@pytest.mark.parametrize("make", [lambda lin: Float8Linear.from_linear(lin),
                                  lambda lin: FP4Linear.from_linear(lin, recipe="dge")])
def test_from_linear_keeps_the_training_flag(make):
    assert make(nn.Linear(64, 64).eval()).training is False
    assert make(nn.Linear(64, 64).train()).training is True


def test_convert_keeps_eval_mode():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).eval()
    assert convert(model, "fp8").converted == ["0", "2"]
    assert not any(m.training for m in model.modules())


def test_keep_high_precision_takes_a_set_of_patterns():
    recipe = recipes["fp8"].with_options(keep_high_precision={"output", "layers.0.*"})
    assert recipe.keep_high_precision == ("layers.0.*", "output")


class _TinyLM(nn.Module):
    """Embedding -> one hidden linear -> output linear ``head_name``; the output linear's weight is
    the embedding's own Parameter when ``tied`` (a tied head under a name no pattern knows)."""

    def __init__(self, head_name: str, tied: bool, vocab: int = 64, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.body = nn.Linear(dim, dim)
        self.head_name = head_name
        setattr(self, head_name, nn.Linear(dim, vocab, bias=False))
        if tied:
            getattr(self, head_name).weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.head_name)(torch.relu(self.body(self.embed(tokens))))


@pytest.mark.parametrize("recipe", ["fp8", "fp4-dge"])
@pytest.mark.parametrize("head_name", ["head", "classifier"])
def test_a_head_tied_to_the_embedding_is_kept_whatever_its_name(recipe, head_name):
    """A linear whose weight is an nn.Embedding's Parameter stays nn.Linear (converting it would
    quantize the embedding table), is reported in ``kept`` like a pattern-matched head, and still
    shares the embedding's Parameter; the other linears are converted as usual."""
    torch.manual_seed(7)
    model = _TinyLM(head_name, tied=True)
    table = model.embed.weight.detach().clone()
    summary = convert(model, recipe)
    head = getattr(model, head_name)
    assert type(head) is nn.Linear and head.weight is model.embed.weight
    assert summary.converted == ["body"] and set(summary.kept) == {head_name}
    assert "embed" in summary.kept[head_name] and "tied" in summary.kept[head_name]
    assert f"{head_name}: " in str(summary)
    tokens = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        h = torch.relu(model.body(model.embed(tokens)))
        # the head is the unquantized embedding table: fp32 logits of the exact weights
        assert torch.equal(head(h), h @ table.t())
    assert torch.equal(model.embed.weight, table)


@pytest.mark.parametrize("head_name", ["head", "classifier"])
def test_an_untied_head_without_a_known_name_is_still_converted(head_name):
    torch.manual_seed(8)
    model = _TinyLM(head_name, tied=False)
    summary = convert(model, "fp8")
    assert isinstance(getattr(model, head_name), Float8Linear)
    assert summary.converted == ["body", head_name] and summary.kept == {}


def test_a_tied_reference_llama_keeps_its_head_under_another_name():
    """The reference Llama with tie_embeddings: its head renamed to one no pattern matches is
    kept by the weight tie alone."""
    torch.manual_seed(9)
    model = Llama(LlamaConfig(**CFG, tie_embeddings=True))
    model.head = model.lm_head
    del model.lm_head
    summary = convert(model, "fp8")
    assert type(model.head) is nn.Linear and model.head.weight is model.embed.weight
    assert set(summary.kept) == {"head"} and "embed" in summary.kept["head"]
    assert summary.num_converted == 14
