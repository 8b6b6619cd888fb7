"""torch.compile of checkpointed models: one graph (no graph break, no recompile), and the same
step as eager — loss, gradients and BatchNorm running statistics (updated once per step).

``torch._dynamo.explain`` is torch's own account of the graphs and breaks; the eager reference
is the plain (not checkpointed) model. Small inputs keep tracing cheap on CPU; the breaks do not
depend on the resolution. Backend ``aot_eager``: AOTAutograd's functionalisation and partitioning
(where a recomputed BatchNorm could update its buffers a second time) without a C compiler.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from cxr.models import MODEL_NAMES, build_model

pytestmark = pytest.mark.integration  # shards, training or subprocesses (CONTRIBUTING.md)

FAST = {"cnn", "densenet121"}  # the others are slow: tracing a ViT/ResNet-50 takes ~10-25 s on a CPU core
SIZE = {"vit": 224}  # timm's ViT at its native size (other sizes: see test_models' pos_embed tests)


def _options(name: str) -> dict:
    return {"arch": "vit_tiny_patch16_224"} if name == "vit" else {}


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in MODEL_NAMES])
def test_checkpointed_model_compiles_without_graph_break(name):
    torch._dynamo.reset()
    model = build_model(name, grad_checkpointing=True, **_options(name)).train()
    size = SIZE.get(name, 64)
    explanation = torch._dynamo.explain(model)(torch.randn(2, 1, size, size), None)
    reasons = [str(b.reason).splitlines()[0] for b in explanation.break_reasons]
    assert explanation.graph_break_count == 0, reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("name", ["cnn", pytest.param("densenet121", marks=pytest.mark.slow)])
def test_compiled_checkpointed_step_equals_eager_and_compiles_once(name):
    torch._dynamo.reset()
    torch.manual_seed(0)
    plain = build_model(name).train()
    ckpt = build_model(name, grad_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(ckpt, backend=counter)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    ckpt_opt = torch.optim.SGD(ckpt.parameters(), lr=0.1)
    for step in range(3):  # three steps: a recompile on the second call would show in the frame count
        image = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(step))
        target = torch.randint(0, 2, (2, 14), generator=torch.Generator().manual_seed(step)).float()
        for model, forward, opt in ((plain, plain, plain_opt), (ckpt, compiled, ckpt_opt)):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(forward(image, None), target)
            loss.backward()
            opt.step()
            opt.zero_grad()
    assert counter.frame_count == 1, f"{counter.frame_count} frames compiled (recompiles or breaks)"
    a, b = plain.state_dict(), ckpt.state_dict()
    assert a.keys() == b.keys()
    for key in a:  # weights after 3 SGD steps, running mean/var, and num_batches_tracked == 3
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    tracked = [v for k, v in b.items() if k.endswith("num_batches_tracked")]
    assert tracked and all(int(v) == 3 for v in tracked)
