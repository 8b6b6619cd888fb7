"""Opening a finished run (cxr.config.Config.load, cxr.runs.open): a config.yaml written by the first
version of the trainer (typed out by hand below, as that version's save_config wrote tiny.yaml) opens
as the typed Config; the opened model scores as the same weights built directly; the loader config
and the batch feed follow the run's settings.

No shards, no training: weights of a freshly built net saved with safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cxr.config import Config
from cxr.data import DataConfig
from cxrbase.errors import CxrError
from cxrbase.labels import LABELS

# cxr/configs/tiny.yaml resolved and saved by the first trainer (commit 880d40f): every field of that
# version, data.shuffle_buffer (retired since), none of the fields added later (data.cache_dir,
# model.init_from, train.stop_flag_timeout_s, logging.trackers …), the cnn's stem_size flat in model:.
OLD_TINY = """\
data:
  shards: build/demo/shards
  backend: dali
  resolution: 128
  batch_size: 16
  eval_batch_size: 32
  num_threads: 1
  device: gpu
  seed: 0
  shuffle_buffer: 1000
  strict: false
  augment: true
  hflip_p: 0.5
  rotate_deg: 5.0
  brightness: 0.1
  contrast: 0.1
  translate: 0.05
  scale: 0.05
  mean: 0.5176
  std: 0.2542
model:
  name: cnn
  num_labels: 14
  pretrained: null
  metadata: none
  meta_dim: 5
  conv_stem: false
  grad_checkpointing: false
  channels_last: false
  dropout: 0.2
  stem_size: 128
loss: {name: bce, weighting: linear, cap: null, smoothing: 0.1, eps: 1.0e-07, batch_stats: rank, gamma: 2.0}
optim: {name: adam, lr: 0.002, betas: [0.9, 0.999], eps: 1.0e-08, weight_decay: 1.0e-05}
schedule: {name: cosine, monitor: val_loss, factor: 0.5, patience: 3, min_delta: 0.0001, min_lr: 1.0e-05,
  warmup_epochs: 0.5}
train: {epochs: 6, max_steps: 0, seed: 0, grad_accum_steps: 1, clip_grad_norm: 0.0, mixed_precision: 'no',
  compile: false, best_metric: val_loss, early_stop_patience: 0, early_stop_min_delta: 1.0e-05,
  restore_best: true, threads: 1, collective_timeout_s: 60.0, deterministic: false}
checkpoint: {run_dir: runs/tiny, resume: auto, force_resume: false, every_steps: 0}
logging: {progress: true, log_every: 5, tensorboard: false}
"""
RETIRED = {("data", "shuffle_buffer")}


def old_run(root: Path, text: str = OLD_TINY, **model) -> Path:
    """A run dir as the first trainer left it: config.yaml + checkpoints/best (weights of a fresh net)."""
    from safetensors.torch import save_file

    from cxr.models import build_model

    torch.manual_seed(0)
    net = build_model("cnn", 14, dropout=0.2, stem_size=128, **model)
    best = root / "checkpoints" / "best"
    best.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(best / "model.safetensors"))
    (best / "meta.json").write_text(json.dumps({"epoch": 3, "labels": list(LABELS), "resolution": 128}))
    (root / "config.yaml").write_text(text)
    return root


def test_an_old_config_yaml_opens_as_the_typed_config(tmp_path):
    run = old_run(tmp_path / "run")
    written = yaml.safe_load(OLD_TINY)
    for given in (run, run / "config.yaml", str(run)):
        cfg = Config.load(given)
        assert isinstance(cfg, Config)
        for section, keys in written.items():
            for key, value in keys.items():
                if (section, key) in RETIRED:
                    continue
                typed = getattr(getattr(cfg, section), key, None)
                if section == "model" and key == "stem_size":
                    typed = cfg.model.options[key]
                assert (list(typed) if isinstance(typed, tuple) else typed) == value, f"{section}.{key}"
        # keys the first version did not write: the defaults those runs trained with
        assert cfg.data.cache_dir == DataConfig().cache_dir and cfg.model.init_from is None
        assert not hasattr(cfg.data, "shuffle_buffer")


def test_open_member_rebuilds_the_saved_weights(tmp_path):
    from cxr.models import build_model
    from cxr.runs.open import member_info, open_member

    run = old_run(tmp_path / "run")
    member = open_member(run)
    torch.manual_seed(0)
    reference = build_model("cnn", 14, dropout=0.2, stem_size=128).eval()
    x = torch.randn(3, 1, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(member.model(x), reference(x), rtol=0, atol=0)
    assert not member.model.training and member.name == "run" and member.resolution == 128
    assert member.labels == list(LABELS) and not member.uses_meta
    info = member_info(member, 128)
    assert (info["model"], info["loss"], info["lr"], info["seed"], info["best_epoch"]) == ("cnn", "bce", 0.002, 0, 3)
    assert info["model_options"] == {"dropout": 0.2, "stem_size": 128}  # build_model's defaults left out


def test_a_tool_refuses_a_run_before_its_weights_load(tmp_path):
    from cxr.runs.open import open_member

    run = old_run(tmp_path / "run", OLD_TINY.replace("metadata: none", "metadata: concat"))
    seen = []
    with pytest.raises(CxrError, match="metadata"):  # the check runs first, not a weights mismatch
        open_member(run, check=lambda m: seen.append(m.config.model.metadata) or _refuse(m.uses_meta))
    assert seen == ["concat"]
    with pytest.raises(CxrError, match="do not fit|missing|unexpected|shape"):  # no check: the weights' error
        open_member(run)


def _refuse(uses_meta: bool) -> None:
    if uses_meta:
        raise CxrError("metadata model refused")


def test_run_config_errors_name_the_file_and_the_fix(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(CxrError, match=r"config.yaml: run config not found — is .*run a training run dir"):
        Config.load(run)
    (run / "config.yaml").write_text("model: {name: cnn\n")
    with pytest.raises(CxrError, match=r"config.yaml: not valid YAML"):
        Config.load(run)
    (run / "config.yaml").write_text("data: {resolution: 64}\n")
    with pytest.raises(CxrError, match=r"config.yaml: no `model:` section"):
        Config.load(run)
    (run / "config.yaml").write_text("model: {name: cnn, depth: 3}\n")
    with pytest.raises(CxrError, match=r"config.yaml: .*model.depth|depth"):
        Config.load(run)


def test_loader_config_is_the_runs_data_section_in_eval_mode(tmp_path, capsys):
    from cxr.runs.open import EvalOptions, read_member

    member = read_member(old_run(tmp_path / "run"))
    cfg = member.loader_config(EvalOptions(shards="/elsewhere", batch_size=7), 96, on_gpu=False)
    assert (cfg.shards, cfg.resolution, cfg.augment, cfg.eval_batch_size, cfg.batch_size) == (
        "/elsewhere",
        96,
        False,
        7,
        16,
    )
    assert (cfg.backend, cfg.num_threads, cfg.mean, cfg.std) == ("dali", 1, 0.5176, 0.2542)
    assert cfg.device == "cpu" and "decoding on CPU" in capsys.readouterr().err  # data.device=gpu, no GPU here
    cfg = member.loader_config(EvalOptions(shards="s", backend="wds", num_threads=3, loader_device="cpu"), 128)
    assert (cfg.backend, cfg.num_threads, cfg.device, cfg.eval_batch_size) == ("wds", 3, "cpu", 32)
    assert capsys.readouterr().err == ""


def test_feed_gives_metadata_only_to_models_that_take_it_and_renormalises(tmp_path):
    from cxr.models import build_model
    from cxr.runs.open import feed, on_device, read_member, renormaliser

    torch.manual_seed(1)
    fused, plain = build_model("cnn", 14, metadata="concat").eval(), build_model("cnn", 14).eval()
    batch = {"image": torch.randn(2, 1, 64, 64), "meta": torch.randn(2, 5), "labels": torch.zeros(2, 14)}
    image, meta = on_device(batch, torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(feed(fused, image, meta), fused(batch["image"], batch["meta"]))
        torch.testing.assert_close(feed(plain, image, meta), plain(batch["image"]))
        torch.testing.assert_close(feed(plain, image, meta, call="pooled"), plain.pooled(batch["image"]))

    # a member trained with mean/std 0.4/0.3 scored from a loader normalising with 0.5176/0.2542
    member = read_member(
        old_run(tmp_path / "run", OLD_TINY.replace("mean: 0.5176", "mean: 0.4").replace("std: 0.2542", "std: 0.3"))
    )
    pixels = np.random.default_rng(0).uniform(0, 1, (1, 1, 8, 8)).astype(np.float32)
    loaded = torch.from_numpy((pixels - 0.5176) / 0.2542)
    renorm = renormaliser(member, DataConfig(), torch.device("cpu"))
    np.testing.assert_allclose(renorm(loaded).numpy(), (pixels - 0.4) / 0.3, rtol=0, atol=1e-5)
    same = renormaliser(read_member(tmp_path / "run"), member.config.data, torch.device("cpu"))
    assert same(loaded) is loaded  # identity when the loader already normalises as the run did


def test_eval_options_from_each_commands_flags_take_only_the_flags_it_has():
    """evaluate, ablation and explain build their EvalOptions from their own parsers: each field is the
    flag's value where the command has the flag, else the dataclass default (hand-listed per command)."""
    from cxr.evaluation.cli_args import build_parser as evaluate_parser
    from cxr.runs.open import EvalOptions
    from cxr.tools.ablation import build_parser as ablation_parser
    from cxr.tools.explain.cli import build_parser as explain_parser

    argv = [
        "--out",
        "o",
        "--shards",
        "s3://b/p",
        "--batch-size",
        "7",
        "--backend",
        "wds",
        "--num-threads",
        "3",
        "--cpu",
    ]
    evaluate = evaluate_parser().parse_args(["--runs", "r", *argv, "--resolution", "96", "--loader-device", "cpu",
                                             "--precision", "bf16"])  # fmt: skip
    assert EvalOptions.from_flags(evaluate) == EvalOptions(
        shards="s3://b/p", resolution=96, backend="wds", batch_size=7, num_threads=3, loader_device="cpu",
        precision="bf16", cpu=True,
    )  # fmt: skip
    explain = explain_parser().parse_args(["--run", "r", *argv, "--resolution", "64", "--loader-device", "gpu"])
    assert EvalOptions.from_flags(explain) == EvalOptions(
        shards="s3://b/p", resolution=64, backend="wds", batch_size=7, num_threads=3, loader_device="gpu", cpu=True
    )  # no --precision: fp32
    ablation = ablation_parser().parse_args(["report", "--runs", "r", "--by", "data.resolution", *argv])
    assert EvalOptions.from_flags(ablation) == EvalOptions(
        shards="s3://b/p", backend="wds", batch_size=7, num_threads=3, cpu=True
    )  # no --resolution / --loader-device: each run's own
