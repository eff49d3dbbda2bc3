"""keep_freed_memory: process-wide malloc settings, measured in a child process so this
one keeps its defaults."""

import json
import os
import subprocess
import sys

import pytest

import windquant_gym as wq
from windquant_gym.compute import process as runtime
from windquant_gym.errors import ConfigError

CHILD = r"""
import json, resource, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
import windquant_gym as wq
applied = wq.keep_freed_memory() if sys.argv[1] == "on" else False
# An episode's allocation pattern: a decoder pass, then 2048 positions x 32k-vocabulary logits
# (256 MiB, above glibc's largest mmap threshold) and their log-softmax.
config = LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=2)
torch.manual_seed(0)
model = LlamaForCausalLM(config).eval()
blocks = torch.randint(0, 32000, (16, 129))
def faults_of_one_pass():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    wq.mean_nll(model, blocks, batch_size=16)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults = [faults_of_one_pass() for _ in range(4)]
print(json.dumps({"applied": applied, "faults": faults[2:]}))
"""


def _child(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "WINDQUANT_KEEP_FREED_MEMORY"}  # conftest turns it off
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(runtime._glibc_mallopt() is None, reason="not glibc: keep_freed_memory is a no-op here")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    pages = 2048 * 32000 * 4 // 4096  # one logits tensor
    default = _child("off")
    assert default["applied"] is False and min(default["faults"]) > pages // 2, default  # fresh pages every time
    kept = _child("on")
    # steady state reached: a pass that faults in (almost) nothing; an aligned-allocation pattern can
    # still grow the heap once in a while, so not every pass is asserted
    assert kept["applied"] is True and min(kept["faults"]) < pages // 20, kept


def test_the_switch_turns_it_into_a_no_op(monkeypatch):
    monkeypatch.setenv("WINDQUANT_KEEP_FREED_MEMORY", "0")
    assert wq.keep_freed_memory() is False
    monkeypatch.setenv("WINDQUANT_KEEP_FREED_MEMORY", "yes")
    with pytest.raises(ConfigError, match=r"WINDQUANT_KEEP_FREED_MEMORY='yes' must be 1 \(default\) or 0"):
        wq.keep_freed_memory()


@pytest.mark.parametrize("bad", [0, -1, 2**31, 1.5, True, "1g"])
def test_a_bad_threshold_is_a_named_error(bad):
    with pytest.raises(ConfigError, match=r"trim_threshold_bytes must be a positive int below 2\*\*31.*default 1 << 30"):
        wq.keep_freed_memory(bad)
