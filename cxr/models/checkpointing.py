"""Activation checkpointing that leaves BatchNorm running statistics exactly as without it.

``torch.utils.checkpoint`` recomputes a segment's forward during backward; in
training mode every BatchNorm in the segment would then update its running
mean/variance a second time (effective momentum 0.19 instead of 0.1), so a
checkpointed run would evaluate differently from a plain one. Here the
recomputation runs those BatchNorms with momentum 0: it still normalises with
the batch statistics (same outputs, same gradients) but the running buffers
keep their values.

Under ``torch.compile`` that context is neither needed nor traceable: Dynamo turns a
checkpoint into one higher-order op and cannot take a ``context_fn`` other than selective
checkpointing's (a ``functools.partial`` over modules is "not a Python constant": a graph
break per segment, and the checkpointed frame recompiled up to the limit and ran eagerly).
AOTAutograd functionalises the forward — the buffer updates become graph outputs applied
once — and the partitioner recomputes only what backward needs, so the buffers are
updated exactly once per step there without it (tests/test_compile_checkpointing.py
checks both against eager).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


@contextlib.contextmanager
def frozen_batchnorm_stats(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Within the block, BatchNorms under ``modules`` normalise by batch statistics without changing buffers.

    The running buffers are still passed (so the op saves the same tensors for
    backward as in the original forward, which checkpoint verifies) but with
    momentum 0 they are left as they were; the step counter is restored after.
    """
    norms = [m for mod in modules for m in mod.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


def _contexts(modules: tuple[nn.Module, ...]):
    return contextlib.nullcontext(), frozen_batchnorm_stats(modules)


def checkpointed(
    fn: Callable[..., torch.Tensor], *inputs: torch.Tensor, modules: tuple[nn.Module, ...]
) -> torch.Tensor:
    """``fn(*inputs)`` storing only ``inputs`` for backward; ``modules`` are those ``fn`` runs (for BatchNorm)."""
    if torch.compiler.is_compiling():
        return checkpoint(fn, *inputs, use_reentrant=False)
    return checkpoint(fn, *inputs, use_reentrant=False, context_fn=functools.partial(_contexts, modules))


def checkpointing_active(module: nn.Module, enabled: bool) -> bool:
    """Checkpoint only when it saves something: training with autograd recording."""
    return enabled and module.training and torch.is_grad_enabled()


class BackboneTrunk(nn.Module):
    """A timm CNN's ``forward_features``; with grad checkpointing on (and training),
    :meth:`checkpointed_forward` — each family's recompute segmentation — runs instead."""

    def __init__(self, backbone: nn.Module, grad_checkpointing: bool = False):
        super().__init__()
        self.backbone = backbone
        self.grad_checkpointing = grad_checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not checkpointing_active(self, self.grad_checkpointing):
            return self.backbone.forward_features(x)
        return self.checkpointed_forward(x)

    def checkpointed_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
