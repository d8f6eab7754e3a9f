"""Optimisers with weight decay only where it regularises.

Decay is off for normalisation layers and all biases, chosen by module type rather than
parameter-name substrings (ffcv matches "bn" by name and misses some; nanoGPT picks by
tensor rank): decaying BN scales only fights the normalisation (Goyal et al. 2017, 5.1).
"""
from __future__ import annotations

import torch
from torch import nn

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if isinstance(module, NORM_TYPES) or name == "bias" else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, opt, lr: float) -> torch.optim.Optimizer:
    """`opt` is the config's Optimizer section; `lr` is already scaled to the global batch."""
    groups = param_groups(model, opt.weight_decay)
    if opt.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=opt.momentum, nesterov=opt.nesterov and opt.momentum > 0)
    return torch.optim.AdamW(groups, lr=lr, betas=opt.betas)
