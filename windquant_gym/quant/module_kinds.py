"""What kind of Linear a module is, from its name: the one classifier that units (attention /
MLP flags), the precision rules (the MLP gate) and the observation's one-hot all read.

Two views, both by name so they work without the model's class: the block a module sits in
(``is_attention`` / ``is_mlp``, from any part of its path in the decoder layer, e.g.
``self_attn.q_proj``), and the role of the Linear itself (:func:`module_kind`, from the last
part: q, k, v, o, gate, up, down, other), with the names LLaMA, GPT-2, GPT-NeoX, Mixtral and
OPT use."""

from __future__ import annotations

from typing import Dict

ATTENTION_TAGS = ("attn", "attention")
MLP_TAGS = ("mlp", "ffn", "feed_forward")

#: Roles of the one-hot, by the last part of the module's name; anything else is "other".
MODULE_KINDS: Dict[str, int] = {
    "q_proj": 0, "query": 0,
    "k_proj": 1, "key": 1,
    "v_proj": 2, "value": 2,
    "o_proj": 3, "out_proj": 3, "dense": 3,
    "gate_proj": 4, "w1": 4,
    "up_proj": 5, "w3": 5, "fc1": 5, "c_fc": 5,
    "down_proj": 6, "w2": 6, "fc2": 6,
}
N_KINDS = 8  # the seven above and "other"


def _last(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def is_attention(name: str) -> bool:
    """Whether the module (its path inside a decoder layer, or the whole path) is in attention."""
    lowered = name.lower()
    return any(tag in lowered for tag in ATTENTION_TAGS)


def is_mlp(name: str) -> bool:
    """Whether the module is in the MLP (feed-forward) block."""
    lowered = name.lower()
    return any(tag in lowered for tag in MLP_TAGS)


def is_mlp_gate(name: str) -> bool:
    """Whether the module is the MLP's gate (``gate_proj``, or a fused ``gate_up_proj``)."""
    return is_mlp(name) and "gate" in _last(name)


def module_kind(name: str) -> int:
    """Index of the module's role in the observation's one-hot (``N_KINDS - 1``: other)."""
    return MODULE_KINDS.get(_last(name), N_KINDS - 1)
