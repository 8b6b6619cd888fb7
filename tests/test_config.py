"""cxr.config: YAML + dotted overrides, validation messages, hashing, shipped configs."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cxr.config import (
    SECTIONS,
    Config,
    config_diff,
    config_hash,
    config_to_dict,
    config_yaml,
    describe_config,
    load_config,
    save_config,
    shipped_configs,
)
from cxr.data import DataConfig
from cxr.models import REGISTRY, build_model
from cxrbase.errors import CxrError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "cxr" / "configs").glob("*.yaml"))


def test_defaults_and_typed_overrides():
    cfg = load_config(
        None,
        [
            "optim.lr=3e-4",
            "optim.betas=[0.8, 0.95]",
            "loss.cap=null",
            "train.epochs=7",
            "model.name=cnn",
            "checkpoint.run_dir=/tmp/x",
            "train.restore_best=false",
            "train.mixed_precision=no",
        ],
    )
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)  # "3e-4" is a string to YAML 1.1
    assert cfg.optim.betas == (0.8, 0.95)
    assert cfg.loss.cap is None and cfg.train.epochs == 7 and cfg.train.restore_best is False
    assert cfg.model.name == "cnn" and cfg.checkpoint.run_dir == "/tmp/x"
    assert cfg.train.mixed_precision == "no"  # a bare `no` is false to YAML 1.1; the choice is meant
    assert Config() == load_config(None)  # no file, no overrides: the dataclass defaults


def test_yaml_file_then_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.01\ntrain:\n  epochs: 3\n")
    cfg = load_config(path, ["optim.lr=0.5"])
    assert cfg.optim.lr == 0.5 and cfg.train.epochs == 3


@pytest.mark.parametrize(
    "override, must_mention",
    [
        ("train.epoch=3", ["train.epoch", "epochs", "grad_accum_steps"]),  # unknown key → valid keys listed
        ("optim.name=sgd", ["optim.name", "adam", "adamw"]),  # bad choice → choices listed
        ("schedule.name=step", ["schedule.name", "plateau", "cosine"]),
        ("train.mixed_precision=fp8", ["mixed_precision", "bf16", "fp16"]),
        ("optim.lr=fast", ["optim.lr", "number"]),  # bad type
        ("train.epochs=2.5", ["train.epochs", "integer"]),
        ("train.compile=maybe", ["train.compile", "true or false"]),
        ("optim.betas=[0.9]", ["optim.betas"]),
        ("trian.epochs=3", ["trian", "train", "checkpoint"]),  # unknown section
        ("epochs=3", ["section.key=value"]),  # malformed override
        ("data.backend=tfrecord", ["data.backend", "dali", "wds"]),  # DataConfig's own check
        ("loss.name=mse", ["loss.name", "bce", "focal"]),  # LossConfig's own check
        ("model.width=3", ["model.width", "stem_size", "dropout"]),  # not an option of cnn/densenet
        ("model.stem_size=big", ["model.stem_size", "integer"]),
        ("schedule.warmup_epochs=1", ["warmup_epochs", "cosine"]),  # cross-field check
    ],
)
def test_bad_key_or_value_names_key_and_choices(override, must_mention):
    with pytest.raises(CxrError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert "\n" not in msg
    for word in must_mention:
        assert word in msg, (word, msg)


def test_model_section_is_exactly_build_model_kwargs():
    cfg = load_config(None, ["model.name=densenet121_cbam", "model.head_dropout=0.25", "model.metadata=mlp"])
    kwargs = config_to_dict(cfg)["model"]
    # the reference: build_model's own signature plus the registry's family options
    inspect.signature(build_model).bind(**kwargs)
    named = set(inspect.signature(build_model).parameters) - {"options"}
    assert set(kwargs) == named | {"head_dropout"}
    assert set(kwargs) - named <= set(REGISTRY["densenet121_cbam"].options)


def test_data_section_is_exactly_dataconfig_fields():
    assert list(config_to_dict(Config())["data"]) == [f.name for f in dataclasses.fields(DataConfig)]


# Config hashes that cxr 7ce5b70 (the last version with data.shuffle_buffer) wrote for these configs.
HASHES_BEFORE_SHUFFLE_BUFFER_WENT = {
    None: "21148f45b4db5a7b",
    "cxr/configs/tiny.yaml": "304accd7b39a792c",
    "cxr/configs/densenet121.yaml": "59ec097aaf6fed90",
}


@pytest.mark.parametrize("path", list(HASHES_BEFORE_SHUFFLE_BUFFER_WENT))
def test_removing_shuffle_buffer_keeps_every_run_hash(path, monkeypatch):
    """data.shuffle_buffer never had an effect and is gone from DataConfig; the hash of a run
    written before (which resume compares) must not change. densenet121.yaml said data.device: gpu
    then and says auto now: on a machine with CUDA (where such runs ran) the hash is the same."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "shuffle_buffer" not in [f.name for f in dataclasses.fields(DataConfig)]
    assert config_hash(load_config(path)) == HASHES_BEFORE_SHUFFLE_BUFFER_WENT[path]


def test_an_old_run_config_yaml_with_shuffle_buffer_still_loads(tmp_path):
    """A run dir's config.yaml written before the key went (here: tiny.yaml as that version wrote
    it) loads, keeps its hash, and the key is not written back."""
    old = load_config("cxr/configs/tiny.yaml")
    text = (
        config_yaml(old)
        .replace("seed: 0, strict:", "seed: 0, shuffle_buffer: 1000, strict:")
        .replace("source_workers: 0, ", "")
    )  # a key that version did not have yet
    assert "shuffle_buffer: 1000" in text and "source_workers" not in text
    path = tmp_path / "config.yaml"
    path.write_text(text)
    cfg = load_config(path)
    assert cfg == old and config_hash(cfg) == HASHES_BEFORE_SHUFFLE_BUFFER_WENT["cxr/configs/tiny.yaml"]
    assert "shuffle_buffer" not in config_yaml(cfg)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["model.name=cnn", "model.stem_size=64", "optim.betas=[0.5,0.6]", "loss.cap=20"])
    save_config(cfg, tmp_path / "config.yaml")
    raw = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert list(raw) == list(SECTIONS)
    assert raw["model"]["stem_size"] == 64  # options flat in the model section, as build_model takes them
    assert load_config(tmp_path / "config.yaml") == cfg


def test_config_hash_tracks_what_is_trained():
    base = load_config(None)
    assert config_hash(base) == config_hash(load_config(None))
    assert len(config_hash(base)) == 16
    # bookkeeping settings do not change what is trained
    same = load_config(
        None,
        [
            "checkpoint.run_dir=elsewhere",
            "logging.log_every=1",
            "train.threads=3",
            "checkpoint.resume=never",
            "data.num_threads=7",
        ],
    )
    assert config_hash(same) == config_hash(base)
    for change in ("optim.lr=0.5", "data.resolution=512", "train.seed=1", "model.dropout=0.1", "loss.name=focal"):
        other = load_config(None, [change])
        assert config_hash(other) != config_hash(base), change
        # data.seed follows train.seed when not set
        want = ["data.seed", "train.seed"] if change.startswith("train.seed") else [change.split("=")[0]]
        assert config_diff(base, other) == want


def test_describe_config_documents_every_field():
    text = describe_config()
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"{section}.{f.name}=" in text
    # the docstring under a field is shown (torchtitan style)
    assert "Micro-batches per optimizer step" in text


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_configs_load_and_build(path):
    cfg = load_config(path)
    kwargs = config_to_dict(cfg)["model"]
    inspect.signature(build_model).bind(**kwargs)
    assert cfg.model.num_labels == 14


def test_suite_configs_are_shipped():
    names = {p.stem for p in SHIPPED}
    assert {
        "densenet121",
        "densenet121_cbam",
        "resnet50_meta",
        "resnet50_convstem_1024",
        "beit",
        "cnn",
        "tiny",
    } <= names


@pytest.mark.integration
def test_cli_bad_config_is_one_line_without_traceback(tmp_path):
    """The real command line: exit 2, one line naming the key, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "cxr.train", "--config", str(ROOT / "cxr/configs/tiny.yaml"), "optim.nme=adam"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "[WARNING]" not in ln]
    assert len(lines) == 1, proc.stderr
    assert "optim.nme" in lines[0] and "lr" in lines[0] and "Traceback" not in proc.stderr


@pytest.mark.integration
def test_shipped_config_by_name_from_another_directory(tmp_path, monkeypatch):
    """`--config densenet121` (and the docs' cxr/configs/X.yaml) work outside the repo; the printed
    config carries the values of the YAML file itself (read here with yaml.safe_load)."""
    shipped = yaml.safe_load((ROOT / "cxr/configs/densenet121.yaml").read_text())
    shipped["data"]["device"] = "gpu" if torch.cuda.is_available() else "cpu"  # auto, resolved when loaded
    # the four commands start at once (each spends ~4 s importing torch; nothing they read is shared)
    givens = ("densenet121", "densenet121.yaml", "cxr/configs/densenet121.yaml", "densenet999")
    procs = {
        given: subprocess.Popen(
            [sys.executable, "-m", "cxr.train", "--config", given, "--print-config"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        for given in givens
    }
    done = {}
    try:
        for given, proc in procs.items():
            out, err = proc.communicate(timeout=300)
            done[given] = (proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for given in givens[:3]:
        returncode, out, err = done[given]
        assert returncode == 0, err
        printed = yaml.safe_load(out)
        for section, values in shipped.items():
            for key, value in values.items():
                assert printed[section][key] == (list(value) if isinstance(value, tuple) else value), (given, key)
    returncode, _, err = done["densenet999"]
    assert returncode == 2
    assert "densenet999" in err and all(p.stem in err for p in SHIPPED)
    # a file in the working directory wins over a shipped name
    (tmp_path / "tiny.yaml").write_text("optim: {lr: 0.125}\n")
    monkeypatch.chdir(tmp_path)
    assert load_config("tiny.yaml").optim.lr == 0.125


@pytest.mark.integration
def test_cli_in_process_errors_and_print_config(capsys):
    from cxr.train import main

    assert main(["--config", "does/not/exist.yaml"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["train.best_metric=accuracy"]) == 2
    err = capsys.readouterr().err
    assert "val_loss" in err and "val_mean_auroc" in err
    assert main(["--print-config", "optim.lr=0.25"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 0.25 and set(printed) == set(SECTIONS)


@pytest.mark.parametrize(
    "text, key",
    [
        ("optim:\n  lr: fast\n", "optim.lr"),  # a type error of _coerce
        ("data:\n  backend: tfrecord\n", "data.backend"),  # a section's own __post_init__ check
        ("train:\n  epoch: 3\n", "train.epoch"),  # an unknown key
    ],
)
def test_bad_value_in_a_yaml_file_names_the_file(tmp_path, text, key):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(CxrError) as err:
        load_config(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and key in msg and "\n" not in msg


@pytest.mark.parametrize("text", ["", "# only a comment\n", "\n\n---\n"])
def test_an_empty_config_file_is_refused_not_all_defaults(tmp_path, text):
    """Battery 2, 8.9: an empty (or comment-only) YAML used to mean every default (DenseNet-121)."""
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(CxrError) as err:
        load_config(path, ["data.resolution=64"])
    msg = str(err.value)
    assert msg.startswith(f"{path}: empty config") and "data.shards" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "text, key, line",
    [
        ("data:\n  resolution: 64\n  resolution: 128\n", "resolution", 3),  # 8.12: a key twice
        ("data:\n  shards: a\ntrain:\n  epochs: 2\ndata:\n  resolution: 64\n", "data", 5),  # 8.13: a section twice
    ],
)
def test_a_duplicate_key_or_section_is_refused_naming_its_line(tmp_path, text, key, line):
    """PyYAML's own safe_load keeps the last of two equal keys without a word (the reference here)."""
    assert yaml.safe_load(text)  # loads silently under plain yaml.safe_load
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(CxrError) as err:
        load_config(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: line {line}: duplicate key {key!r}") and "\n" not in msg


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "nan", "inf"])
def test_non_finite_numbers_are_refused(tmp_path, value):
    """8.6: `lr: .nan` reached torch.optim's own ValueError traceback (`<= 0` lets NaN through)."""
    path = tmp_path / "c.yaml"
    path.write_text(f"optim:\n  lr: {value}\n")
    with pytest.raises(CxrError, match="optim.lr=.*finite"):
        load_config(path)
    with pytest.raises(CxrError, match="loss.cap=.*finite"):
        load_config(None, [f"loss.cap={value}"])


def test_a_non_utf8_config_is_one_line(tmp_path):
    """8.15: a UTF-16 file (BOM ff fe) was a UnicodeDecodeError traceback."""
    path = tmp_path / "u16.yaml"
    path.write_bytes("optim:\n  lr: 0.1\n".encode("utf-16"))
    with pytest.raises(CxrError) as err:
        load_config(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: not UTF-8 text") and "save it as UTF-8" in msg and "\n" not in msg


@pytest.mark.parametrize("cuda, device", [(True, "gpu"), (False, "cpu")])
def test_shipped_gpu_configs_pick_the_decode_device_at_load(monkeypatch, cuda, device):
    """data.device=auto in every shipped config that meant gpu: resolved when loaded (config.yaml and
    the hash carry gpu or cpu) and said; an explicit device is kept as given."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    for name in ("densenet121", "densenet121_cbam", "resnet50_meta", "resnet50_convstem_1024", "beit", "cnn"):
        raw = yaml.safe_load(shipped_configs()[name].read_text())
        assert raw["data"]["device"] == "auto", name
        cfg = load_config(name)
        assert cfg.data.device == device and f"data.device=auto → {device}" in cfg.device_note, name
        assert yaml.safe_load(config_yaml(cfg))["data"]["device"] == device
    explicit = load_config("densenet121", ["data.device=cpu"])
    assert explicit.data.device == "cpu" and explicit.device_note is None
    with pytest.raises(CxrError, match=r"data.device='tpu': unknown — choose one of cpu, gpu, auto"):
        load_config(None, ["data.device=tpu"])
