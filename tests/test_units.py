import pytest
import torch
import torch.nn as nn

import windquant_gym as wq
from windquant_gym.errors import ConfigError, ModelStructureError


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleDict({"qkv": nn.Linear(10, 30, bias=False)})
        self.ffn = nn.Linear(10, 7)
        self.norm = nn.LayerNorm(10)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 10)
        self.blocks = nn.ModuleList([Block(), Block(), Block()])
        self.head = nn.Linear(10, 5)


def test_every_weight_belongs_to_exactly_one_unit(tiny):
    model, _ = tiny
    units = wq.find_units(model, chunk_size=48)
    cover = {}
    for unit in units:
        weight = model.get_submodule(unit.module).weight
        grid = cover.setdefault(unit.module, torch.zeros(weight.shape, dtype=torch.int32))
        grid[:, unit.col_start : unit.col_end] += 1
    assert all(bool((grid == 1).all()) for grid in cover.values())
    linears = [n for n, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)]
    assert len(cover) == len(linears) == 14
    assert "lm_head" not in " ".join(cover) and "embed" not in " ".join(cover)


def test_order_flags_and_ragged_chunks(tiny):
    model, _ = tiny
    units = wq.find_units(model, chunk_size=48)
    assert [u.index for u in units] == list(range(len(units)))
    first_layer = [u for u in units if u.layer == 0]
    modules = list(dict.fromkeys(u.module.split(".")[-1] for u in first_layer))
    assert modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    q = [u for u in first_layer if u.module.endswith("q_proj")]
    assert [(u.col_start, u.col_end) for u in q] == [(0, 48), (48, 96), (96, 128)]  # last one narrower
    assert all(u.is_attention and not u.is_mlp for u in q)
    assert all(u.is_mlp and not u.is_attention for u in first_layer if "mlp" in u.module)
    assert [u.layer for u in units] == sorted(u.layer for u in units)


def test_generic_discovery_on_a_non_llama_model():
    units = wq.find_units(Toy(), chunk_size=4)
    assert {u.module for u in units} == {f"blocks.{i}.{m}" for i in range(3) for m in ("attn.qkv", "ffn")}
    assert [u.width for u in units if u.module == "blocks.0.ffn"] == [4, 4, 2]
    assert all(u.is_attention for u in units if "qkv" in u.module)


def test_bad_models_and_chunk_sizes_get_named_errors():
    with pytest.raises(ModelStructureError, match="decoder blocks"):
        wq.find_units(nn.Sequential(nn.Linear(3, 3)), 4)
    with pytest.raises(ConfigError, match="chunk_size"):
        wq.find_units(Toy(), 0)
