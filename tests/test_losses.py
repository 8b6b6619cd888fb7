"""cxr.models.losses against direct float64 numpy transcriptions of the SPEC.md formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cxr.models import losses
from cxr.models.losses import LossConfig, build_loss
from cxrbase.errors import CxrError

B, C = 64, 14


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, size=(B, C))
    y = (rng.random((B, C)) < rng.uniform(0.02, 0.5, size=C)).astype(np.float64)
    y[:, 7] = 0.0  # a label without positives in the batch (r = 0)
    return z, y


def t(a: np.ndarray, grad: bool = False) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64, requires_grad=grad)


# ---- numpy transcriptions of SPEC.md (p = 1/(1+e^-z); logs of p computed directly)
def np_p(z):
    return 1.0 / (1.0 + np.exp(-z))


def np_smooth(y, a):
    return y * (1 - a) + a / 2


def np_bce(z, y, a=0.0):
    y, p = np_smooth(y, a), np_p(z)
    return -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))


def np_weighted_bce(z, y, w, a=0.0):
    y, p = np_smooth(y, a), np_p(z)
    return -np.mean(w * y * np.log(p) + (1 - y) * np.log(1 - p))


def np_dynamic(z, y, s=0.1, eps=1e-7, a=0.0, clip=False):
    r = y.mean(axis=0)  # unsmoothed targets, as documented
    rt = r * (1 - s) + 0.5 * s
    wp, wn = 1 / (rt + eps), 1 / (1 - rt + eps)
    p = np_p(z)
    if clip:
        p = np.clip(p, eps, 1 - eps)
    y = np_smooth(y, a)
    return -np.mean(y * wp * np.log(p) + (1 - y) * wn * np.log(1 - p))


def np_focal(z, y, gamma=2.0, alpha=None, a=0.0):
    y, p = np_smooth(y, a), np_p(z)
    ap, an = (1.0, 1.0) if alpha is None else (alpha, 1 - alpha)
    return -np.mean(ap * y * (1 - p) ** gamma * np.log(p) + an * (1 - y) * p**gamma * np.log(1 - p))


@pytest.mark.parametrize("a", [0.0, 0.1])
def test_bce_matches_formula(batch, a):
    z, y = batch
    assert losses.bce(t(z), t(y), label_smoothing=a).item() == pytest.approx(np_bce(z, y, a), rel=1e-12)


@pytest.mark.parametrize("scheme,cap", [("linear", None), ("log", None), ("linear", 20.0)])
def test_positive_weights_formula(scheme, cap):
    pi = np.array([0.5, 0.1, 0.01, 0.002, 0.2])
    odds = (1 - pi) / pi
    expected = odds if scheme == "linear" else np.log(1 + odds)
    if cap is not None:
        expected = np.minimum(expected, cap)
    np.testing.assert_allclose(losses.positive_weights(pi, scheme, cap), expected, rtol=1e-14)
    if cap is not None:
        assert losses.positive_weights(pi, scheme, cap).max() == cap  # 0.002 -> 499 capped


def test_positive_weights_rejects_empty_label_without_cap():
    with pytest.raises(CxrError, match="cap"):
        losses.positive_weights(np.array([0.1, 0.0]))
    assert losses.positive_weights(np.array([0.1, 0.0]), cap=20.0)[1] == 20.0


@pytest.mark.parametrize("a", [0.0, 0.1])
def test_weighted_bce_matches_formula(batch, a):
    z, y = batch
    w = np.random.default_rng(1).uniform(0.5, 30, size=C)
    got = losses.weighted_bce(t(z), t(y), w, label_smoothing=a).item()
    assert got == pytest.approx(np_weighted_bce(z, y, w, a), rel=1e-12)


@pytest.mark.parametrize("s,a", [(0.1, 0.0), (0.0, 0.0), (0.3, 0.1)])
def test_dynamic_weighted_bce_matches_formula(batch, s, a):
    z, y = batch
    got = losses.dynamic_weighted_bce(t(z), t(y), smoothing=s, label_smoothing=a).item()
    assert got == pytest.approx(np_dynamic(z, y, s=s, a=a), rel=1e-12)


def test_dynamic_agrees_with_clipped_original_where_clip_inactive(batch):
    z, y = batch
    z = np.clip(z, -12, 12)  # p in [6e-6, 1 - 6e-6]: the [1e-7, 1 - 1e-7] clip never bites
    got = losses.dynamic_weighted_bce(t(z), t(y)).item()
    assert got == pytest.approx(np_dynamic(z, y, clip=True), rel=1e-12)


def clipped_original(z: torch.Tensor, y: torch.Tensor, s=0.1, eps=1e-7) -> torch.Tensor:
    """The reference implementation (clipped probabilities), in torch for its gradient."""
    r = y.mean(dim=0)
    rt = r * (1 - s) + 0.5 * s
    p = torch.sigmoid(z).clamp(eps, 1 - eps)
    return -(y * torch.log(p) / (rt + eps) + (1 - y) * torch.log(1 - p) / (1 - rt + eps)).mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_finite_at_extreme_logits(dtype):
    y = torch.tensor([[1.0, 0.0, 1.0, 0.0]] * 2, dtype=dtype)
    z0 = torch.tensor([[-100.0, 100.0, 100.0, -100.0]] * 2, dtype=dtype)  # wrong, wrong, right, right
    fns = {
        "bce": lambda z: losses.bce(z, y),
        "weighted_bce": lambda z: losses.weighted_bce(z, y, torch.full((4,), 10.0)),
        "dynamic": lambda z: losses.dynamic_weighted_bce(z, y),
        "focal": lambda z: losses.focal(z, y, alpha=0.25),
        "smoothed": lambda z: losses.dynamic_weighted_bce(z, y, label_smoothing=0.1),
    }
    for name, fn in fns.items():
        z = z0.clone().requires_grad_(True)
        loss = fn(z)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(z.grad).all(), name
        # The confidently wrong logits still get a full-size push the right way.
        assert (z.grad[:, 0] < -1e-3).all() and (z.grad[:, 1] > 1e-3).all(), name
    z = z0.clone().requires_grad_(True)
    clipped_original(z, y).backward()
    assert (z.grad == 0).all()  # the clipped original saturates: no learning signal at all
    z = z0.clone().requires_grad_(True)
    losses.dynamic_weighted_bce(z, y).backward()
    # d loss / dz at a wrong positive = -w+ (1 - p) / (B C); column 0 is all positive:
    # r = 1, r~ = 0.9 + 0.05 = 0.95, 1 - p = 1 at z = -100.
    expected = -1 / (0.95 + 1e-7) / y.numel()
    assert z.grad[0, 0].item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("gamma,alpha,a", [(2.0, None, 0.0), (2.0, 0.25, 0.0), (0.5, 0.75, 0.1), (0.0, None, 0.0)])
def test_focal_matches_formula(batch, gamma, alpha, a):
    z, y = batch
    got = losses.focal(t(z), t(y), gamma=gamma, alpha=alpha, label_smoothing=a).item()
    assert got == pytest.approx(np_focal(z, y, gamma, alpha, a), rel=1e-11)


def test_focal_gamma0_is_bce(batch):
    z, y = batch
    assert losses.focal(t(z), t(y), gamma=0.0).item() == pytest.approx(np_bce(z, y), rel=1e-12)


def test_label_smoothing_formula():
    y = torch.tensor([0.0, 1.0])
    np.testing.assert_allclose(losses.smooth_labels(y, 0.2).numpy(), [0.1, 0.9], rtol=1e-6)
    with pytest.raises(CxrError, match="label_smoothing"):
        losses.smooth_labels(y, 1.0)


def test_rank_positive_ratio_has_no_gradient(batch):
    z, y = batch
    yt = t(y, grad=True)
    r = losses.positive_ratio(yt)
    assert not r.requires_grad
    np.testing.assert_allclose(r.numpy(), y.mean(axis=0), rtol=1e-15)


def test_low_precision_logits_computed_in_float32(batch):
    z, y = batch
    got = losses.dynamic_weighted_bce(t(z).to(torch.bfloat16), t(y))
    assert got.dtype == torch.float32
    zb = t(z).to(torch.bfloat16).double().numpy()
    assert got.item() == pytest.approx(np_dynamic(zb, y), rel=1e-5)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(CxrError, match="one logit per label"):
        losses.bce(torch.zeros(2, 14), torch.zeros(2, 15))


# ---- build_loss and LossConfig
@pytest.mark.parametrize("name", ["bce", "weighted_bce", "dynamic_weighted_bce", "focal"])
def test_build_loss_each_name(batch, name):
    z, y = batch
    pi = np.linspace(0.01, 0.3, C)
    cfg = LossConfig(name=name, weighting="log", cap=5.0, smoothing=0.2, gamma=1.5, alpha=0.3, label_smoothing=0.05)
    got = build_loss(cfg, pi)(t(z), t(y)).item()
    w = np.minimum(np.log(1 + (1 - pi) / pi), 5.0)
    expected = {
        "bce": np_bce(z, y, 0.05),
        "weighted_bce": np_weighted_bce(z, y, w, 0.05),
        "dynamic_weighted_bce": np_dynamic(z, y, s=0.2, a=0.05),
        "focal": np_focal(z, y, 1.5, 0.3, 0.05),
    }[name]
    assert got == pytest.approx(expected, rel=1e-11)


def test_weighted_bce_needs_prevalence():
    with pytest.raises(CxrError, match="train_prevalence"):
        build_loss(LossConfig(name="weighted_bce"), None)


@pytest.mark.parametrize(
    "field,value",
    [
        ("name", "hinge"),
        ("weighting", "sqrt"),
        ("cap", 0.0),
        ("smoothing", 1.5),
        ("eps", 0.0),
        ("batch_stats", "node"),
        ("gamma", -1.0),
        ("alpha", 1.2),
        ("label_smoothing", 1.0),
    ],
)
def test_loss_config_validation_names_field(field, value):
    with pytest.raises(CxrError, match=rf"loss\.{field}=.*valid"):
        LossConfig(**{field: value})


def test_loss_config_lists_choices():
    with pytest.raises(CxrError, match="bce | weighted_bce | dynamic_weighted_bce | focal"):
        LossConfig(name="nope")


# ---- global batch statistics across 2 gloo processes
SIZES = ([24, 24], [10, 38])  # equal and unequal per-rank batches


def _rank_worker(rank: int, world: int, init_file: str, out_dir: str, z: np.ndarray, y: np.ndarray) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for sizes in SIZES:
            lo = sum(sizes[:rank])
            zr = torch.tensor(z[lo : lo + sizes[rank]], requires_grad=True)
            yr = torch.tensor(y[lo : lo + sizes[rank]])
            out = {
                "r_global": losses.positive_ratio(yr, "global"),
                "r_rank": losses.positive_ratio(yr, "rank"),
                "r_grad": losses.positive_ratio(yr.clone().requires_grad_(True), "global").requires_grad,
            }
            loss = losses.dynamic_weighted_bce(zr, yr, batch_stats="global")
            loss.backward()
            averaged = loss.detach().clone()
            dist.all_reduce(averaged)  # what DDP's gradient averaging optimises
            out.update(
                loss=loss.detach(),
                averaged=averaged / world,
                grad=zr.grad,
                rank_loss=losses.dynamic_weighted_bce(zr.detach(), yr, batch_stats="rank"),
            )
            torch.save(out, f"{out_dir}/rank{rank}-{sizes[0]}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_global_batch_stats_across_two_gloo_ranks(tmp_path):
    rng = np.random.default_rng(3)
    n = 2 * 24
    z = rng.normal(0, 2, size=(n, C))
    y = (rng.random((n, C)) < 0.15).astype(np.float64)
    y[:24, 2] = 0  # a label positive only on rank 1: the per-rank r differ strongly
    y[24:30, 2] = 1
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "pg"), str(tmp_path), z, y), nprocs=2, join=True)
    for sizes in SIZES:
        res = [torch.load(tmp_path / f"rank{r}-{sizes[0]}.pt") for r in range(2)]
        for r in range(2):  # global r = r of the concatenated batch, on every rank, without gradient
            np.testing.assert_allclose(res[r]["r_global"].numpy(), y.mean(axis=0), rtol=1e-12)
            assert res[r]["r_grad"] is False
        assert not np.allclose(res[0]["r_rank"].numpy(), res[1]["r_rank"].numpy())
        assert res[0]["averaged"].item() == res[1]["averaged"].item()  # both ranks see one loss
        if sizes[0] == sizes[1]:
            # Mean of per-rank losses and their gradients = one process on the whole batch.
            zt = t(z, grad=True)
            whole = losses.dynamic_weighted_bce(zt, t(y))
            whole.backward()
            assert res[0]["averaged"].item() == pytest.approx(whole.item(), rel=1e-12)
            grads = torch.cat([res[0]["grad"], res[1]["grad"]]) / 2
            np.testing.assert_allclose(grads.numpy(), zt.grad.numpy(), rtol=1e-10, atol=1e-15)
            rank_mean = (res[0]["rank_loss"] + res[1]["rank_loss"]).item() / 2
            assert abs(rank_mean - whole.item()) > 1e-3  # per-rank stats really differ
