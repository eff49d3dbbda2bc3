"""How much the model's loss grows per unit of a module's output error: measured by the model,
once, with the Fisher information at each quantized module's output.

The table's error of a unit is its own output error relative to its module's output energy,
``||(W - Q) X||^2 / ||W X||^2``; it cannot see what that error costs downstream: an error in the
first layer passes through every later one, the last MLP's goes straight to the logits, and
one down projection of SmolLM2-135M (layer 11) carries the model's massive activations. The
calibrated knapsack corrects three groups of units by factors chosen on the proxy; this measures
a factor for every module instead (exllamav3 measures each tensor's sensitivity once by
injecting noise shaped like the quantizer's error and predicts the divergence as
``S_t * err^2``; here the same second-order term comes from gradients, in one backward pass).

For a small output error ``dY`` the expected growth of the KL divergence to the model's own
next-token distributions is ``1/2 sum dY^T F dY`` with ``F`` the Fisher information at that
output. Its diagonal is measured as the mean squared gradient of the NLL of labels *sampled
from the model's own distribution* (the true Fisher, not the empirical one: unbiased for the
KL, and the sampled labels at different positions are independent, so one backward pass of
the summed loss estimates the sum over positions). An error of relative size ``e`` spread
uniformly over the module's output elements has per element ``e * mean(Y^2)``, so

    S_m = sum_positions,channels E[g^2] * mean(Y_m^2)    (the KL summed over the positions grows by ~S_m * e / 2)

(A quantization error grows with each position's activations rather than uniformly; weighting
each position's squared gradient by its own ``||Y_t||^2`` is the refinement not made here.)

A knapsack on ``S_m * e`` (:mod:`windquant_gym.allocators.calibrated_knapsack`'s
``calibrated-knapsack-fisher``) spends its bits where the model, not the table, says they
matter. Only the hidden states get gradients: the model's parameters and their ``.grad`` are
left as they were.
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch
from torch import nn

from ..compute.kernels import proxy_precision
from ..errors import ConfigError


def fisher_sensitivity(model: nn.Module, modules: Sequence[str], blocks: torch.Tensor, *, label_samples: int = 2,
                       batch_size: int = 2, seed: int = 0, dtype: str = "float32",
                       progress: bool = False) -> Dict[str, float]:
    """``S_m`` of every module in ``modules`` (dotted ``nn.Linear`` paths) on the ``[n, L]``
    token ``blocks``: see the module docstring. ``label_samples`` label draws per block (each a
    backward pass; the forward pass is shared); ``seed`` fixes the draws. ``batch_size`` blocks
    at a time: the graph holds a few copies of the ``tokens x vocabulary`` logits (2 x 256 tokens
    of SmolLM2's 49k vocabulary: about 0.5 GB; 8 blocks took 10 GB). ``dtype``: 'bfloat16' runs
    the matrix products in bf16 (as the proxy does where the CPU has bf16 units), 'float32' not."""
    if not isinstance(label_samples, int) or isinstance(label_samples, bool) or label_samples < 1:
        raise ConfigError(f"label_samples must be a positive integer, got {label_samples!r}; 2 is the default.")
    if blocks.dim() != 2 or len(blocks) == 0:
        raise ConfigError(f"blocks must be a non-empty [n, seq_len] tensor of token ids, got shape {tuple(blocks.shape)}.")
    named = dict(model.named_modules())
    missing = [m for m in modules if not isinstance(named.get(m), nn.Linear)]
    if missing:
        raise ConfigError(f"modules {missing[:3]} are not nn.Linear modules of this model; pass the units' module names.")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}; 2 is the default.")
    device = next(model.parameters()).device
    generators: Dict[torch.device, torch.Generator] = {}  # on the logits' device (a model may span devices)
    squared_gradient = {m: 0.0 for m in modules}
    output_energy = {m: 0.0 for m in modules}
    output_size = {m: 0 for m in modules}
    outputs: Dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module, inputs, output):
            outputs[name] = output
        return hook

    handles = [named[m].register_forward_hook(keep(m)) for m in modules]
    # autograd.grad(inputs=outputs) computes no parameter gradient and writes no .grad; the graph
    # starts at the embeddings' output so that a frozen model (requires_grad False) has one too
    handles.append(model.get_input_embeddings().register_forward_hook(
        lambda module, inputs, output: output.detach().requires_grad_(True)))
    starts = range(0, len(blocks), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="Fisher sensitivity", unit="batch")
    try:
        with torch.enable_grad(), proxy_precision(device, dtype):
            for start in starts:
                batch = blocks[start:start + batch_size].to(device)
                outputs.clear()
                logits = model(batch).logits.float()
                flat = logits.reshape(-1, logits.shape[-1])
                probs = torch.softmax(flat.detach(), dim=-1)
                tensors = [outputs[m] for m in modules]
                for m, y in zip(modules, tensors):
                    output_energy[m] += float(y.detach().float().pow(2).sum())
                    output_size[m] += y.numel()
                if probs.device not in generators:  # seeded once: the draws run on across batches
                    generators[probs.device] = torch.Generator(device=probs.device).manual_seed(seed)
                generator = generators[probs.device]
                for draw in range(label_samples):
                    labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                    loss = nn.functional.cross_entropy(flat, labels, reduction="sum")
                    grads = torch.autograd.grad(loss, tensors, retain_graph=draw < label_samples - 1)
                    for m, g in zip(modules, grads):
                        squared_gradient[m] += float(g.float().pow(2).sum()) / label_samples
                del logits, flat, probs, tensors, grads, loss  # freed before the next batch's forward pass
                outputs.clear()
    finally:
        for handle in handles:
            handle.remove()
        outputs.clear()
    return {m: squared_gradient[m] * output_energy[m] / max(output_size[m], 1) for m in modules}


__all__ = ["fisher_sensitivity"]
