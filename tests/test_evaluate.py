"""`python -m cxr.evaluate` end to end on tiny synthetic shards and two tiny members.

References are independent of the evaluator: scikit-learn for every AUROC/AUPRC,
numpy for the ensemble mean, PIL + tarfile + the model itself for the probabilities,
the splits table for the key set.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from helpers import RES, free_port, make_member, phantom_shards
from PIL import Image
from safetensors.torch import load_file
from sklearn.metrics import average_precision_score, roc_auc_score

from cxr.evaluate import main as evaluate_main
from cxrbase.errors import CxrError
from cxrbase.labels import LABELS

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ fixtures ---

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.integration]  # conftest.py


@pytest.fixture(scope="session")
def shards_dir(tmp_path_factory) -> Path:
    """160 synthetic 64 px phantoms, random patient split 40/30/30, packed."""
    root = tmp_path_factory.mktemp("eval-shards")
    return phantom_shards(root, 160, RES, 3, fractions="0.4,0.3,0.3", split_seed=1).shards


@pytest.fixture(scope="session")
def members(tmp_path_factory, shards_dir) -> list[Path]:
    root = tmp_path_factory.mktemp("eval-runs")
    return [make_member(root / f"member{s}", shards_dir, seed=s) for s in (1, 2)]


@pytest.fixture(scope="session")
def report(tmp_path_factory, shards_dir, members) -> Path:
    out = tmp_path_factory.mktemp("eval-report") / "report"
    code = evaluate_main(
        [
            "--runs",
            *map(str, members),
            "--shards",
            str(shards_dir),
            "--split",
            "test",
            "--thresholds-from",
            "val",
            "--bootstrap",
            "200",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    return out


def copy_member(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def run_args(runs, shards, out, *extra) -> list[str]:
    return [
        "--runs",
        *map(str, runs),
        "--shards",
        str(shards),
        "--out",
        str(out),
        "--bootstrap",
        "0",
        "--no-figures",
        "--debug",
        *extra,
    ]


# ------------------------------------------------------------ the outputs ------


def test_report_files_exist_and_stdout_table(report, capsys):
    for name in (
        "predictions.parquet",
        "aucs.csv",
        "thresholds.json",
        "metrics.csv",
        "members.json",
        "roc.png",
        "pr.png",
        "report.md",
    ):
        assert (report / name).stat().st_size > 0, name
    text = (report / "report.md").read_text()
    assert "member1" in text and "member2" in text and "ensemble" in text
    assert "not directly comparable" in text and "Wang 2017" in text and "prevalence" in text
    for png in ("roc.png", "pr.png"):
        with Image.open(report / png) as im:
            assert im.size[0] >= 1000 and im.size[1] >= 1000


def _split_frame(report: Path, split: str) -> pd.DataFrame:
    frame = pd.read_parquet(report / "predictions.parquet")
    return frame[frame["split"] == split]


def test_every_auc_number_equals_sklearn(report):
    assert _assert_aucs_match_sklearn(report, {"member1", "member2", "ensemble"}) >= 3 * 8


def _assert_aucs_match_sklearn(report: Path, members: set[str]) -> int:
    """Check every aucs.csv number against sklearn on predictions.parquet; return labels checked."""
    preds = _split_frame(report, "test")
    aucs = pd.read_csv(report / "aucs.csv")
    assert set(aucs["member"]) == members
    checked = 0
    for member, rows in aucs.groupby("member"):
        p = preds[preds["member"] == member].sort_values("key")
        table = rows.set_index("label")
        per_label = []
        for label in LABELS:
            y = p[f"true_{label}"].to_numpy()
            assert table.loc[label, "prevalence"] == pytest.approx(y.mean(), abs=1e-15)
            assert table.loc[label, "n_pos"] == y.sum() and table.loc[label, "n"] == len(y)
            if 0 < y.sum() < len(y):
                auroc = roc_auc_score(y, p[label])
                assert table.loc[label, "auroc"] == pytest.approx(auroc, abs=1e-12)
                assert table.loc[label, "auprc"] == pytest.approx(average_precision_score(y, p[label]), abs=1e-12)
                per_label.append(auroc)
                checked += 1
            else:
                assert np.isnan(table.loc[label, "auroc"])
        assert table.loc["mean", "auroc"] == pytest.approx(np.mean(per_label), abs=1e-12)
    return checked


def test_ensemble_is_mean_of_member_probabilities(report):
    preds = _split_frame(report, "test")
    probs = {m: g.sort_values("key")[list(LABELS)].to_numpy() for m, g in preds.groupby("member")}
    truth = preds[preds["member"] == "member1"].sort_values("key")[[f"true_{c}" for c in LABELS]].to_numpy()
    mean = (probs["member1"] + probs["member2"]) / 2
    np.testing.assert_allclose(probs["ensemble"], mean, rtol=0, atol=1e-15)
    aucs = pd.read_csv(report / "aucs.csv").set_index(["member", "label"])
    for c, label in enumerate(LABELS):
        if 0 < truth[:, c].sum() < len(truth):
            assert aucs.loc[("ensemble", label), "auroc"] == pytest.approx(
                roc_auc_score(truth[:, c], mean[:, c]), abs=1e-12
            )


def test_keys_are_the_split_exactly_once(report, shards_dir):
    manifest = json.loads((shards_dir / "manifest.json").read_text())
    table = pd.read_parquet(manifest["splits_file"])
    for split in ("test", "val"):
        expected = {Path(i).stem for i in table.loc[table["split"] == split, "image"]}
        preds = _split_frame(report, split)
        for member, g in preds.groupby("member"):
            assert not g["key"].duplicated().any(), (split, member)
            assert set(g["key"]) == expected, (split, member)


def _reference_probabilities(run_dir: Path, shards: Path, split: str) -> dict[str, np.ndarray]:
    """Decode the split's PNGs with PIL straight from the tars, normalise, run the model."""
    from cxr.data import DataConfig
    from cxr.models import build_model

    cfg = DataConfig()  # the default mean/std, as in the member's config
    model = build_model("cnn", 14, dropout=0.0)
    model.load_state_dict(load_file(str(run_dir / "checkpoints" / "best" / "model.safetensors")))
    model.eval()
    keys, images = [], []
    for tar_path in sorted(shards.glob(f"{split}-*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".png"):
                    pixels = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("L"))
                    keys.append(member.name[:-4])
                    images.append((torch.from_numpy(pixels.astype(np.float32) / 255) - cfg.mean) / cfg.std)
    with torch.no_grad():
        probs = torch.sigmoid(model(torch.stack(images)[:, None]).double()).numpy()
    return dict(zip(keys, probs))


def test_probabilities_equal_direct_inference(report, members, shards_dir):
    preds = _split_frame(report, "test")
    for run_dir, name in zip(members, ("member1", "member2")):
        reference = _reference_probabilities(run_dir, shards_dir, "test")
        got = preds[preds["member"] == name].set_index("key")
        assert set(got.index) == set(reference)
        for key, probs in reference.items():
            np.testing.assert_allclose(got.loc[key, list(LABELS)].to_numpy(dtype=float), probs, atol=2e-5)


def test_from_predictions_reproduces_every_table(report, tmp_path):
    out = tmp_path / "again"
    assert (
        evaluate_main(
            [
                "--from-predictions",
                str(report / "predictions.parquet"),
                "--split",
                "test",
                "--thresholds-from",
                "val",
                "--bootstrap",
                "200",
                "--out",
                str(out),
                "--no-figures",
            ]
        )
        == 0
    )
    for name in ("aucs.csv", "metrics.csv", "thresholds.json", "calibration.csv", "calibration.json", "subgroups.csv"):
        assert (out / name).read_bytes() == (report / name).read_bytes(), name
    assert "member1" in (out / "report.md").read_text()  # run configs come from members.json


def test_thresholds_are_tuned_on_val(report):
    """The F1 threshold of each label maximises sklearn's F1 over all candidate thresholds on val."""
    from sklearn.metrics import f1_score

    doc = json.loads((report / "thresholds.json").read_text())
    assert doc["tuned_on"] == "val"
    val = _split_frame(report, "val")
    g = val[val["member"] == "ensemble"]
    for label in LABELS:
        y, s = g[f"true_{label}"].to_numpy(), g[label].to_numpy()
        if not 0 < y.sum() < len(y):
            continue
        best = max(f1_score(y, s >= t) for t in np.unique(s))
        assert f1_score(y, s >= doc["members"]["ensemble"]["f1"][label]) == pytest.approx(best)


# ------------------------------------------------------- refusals and errors ---


class _Payload:
    """Unpickling this runs Path.touch — proof that code would have executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_code_checkpoint_is_refused_not_executed(members, shards_dir, tmp_path):
    # Only model.safetensors is ever read: a pickled model.pt beside it is not a checkpoint.
    run = copy_member(members[0], tmp_path / "evil")
    best = run / "checkpoints" / "best"
    (best / "model.safetensors").unlink()
    marker = tmp_path / "executed"
    torch.save({"conv.weight": torch.zeros(1), "payload": _Payload(marker)}, best / "model.pt")
    with pytest.raises(CxrError, match="no best checkpoint") as err:
        evaluate_main(run_args([run], shards_dir, tmp_path / "out"))
    assert str(best / "model.safetensors") in str(err.value) and str(run) in str(err.value)
    assert not marker.exists()
    # The file really carries code: a full unpickle would have run it.
    torch.load(best / "model.pt", weights_only=False)
    assert marker.exists()


def test_pickle_disguised_as_safetensors_is_refused(members, shards_dir, tmp_path):
    run = copy_member(members[0], tmp_path / "disguised")
    marker = tmp_path / "executed"
    (run / "checkpoints" / "best" / "model.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CxrError, match="corrupt"):
        evaluate_main(run_args([run], shards_dir, tmp_path / "out"))
    assert not marker.exists()


def test_missing_checkpoint_names_run_and_file(members, shards_dir, tmp_path):
    run = copy_member(members[0], tmp_path / "nockpt")
    (run / "checkpoints" / "best" / "model.safetensors").unlink()
    with pytest.raises(CxrError) as err:
        evaluate_main(run_args([run, members[1]], shards_dir, tmp_path / "out"))
    assert str(run) in str(err.value) and "model.safetensors" in str(err.value)


def test_cli_prints_one_line_error(members, shards_dir, tmp_path, capsys):
    run = copy_member(members[0], tmp_path / "nockpt")
    (run / "checkpoints" / "best" / "model.safetensors").unlink()
    args = [a for a in run_args([run], shards_dir, tmp_path / "out") if a != "--debug"]
    assert evaluate_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err


def test_other_label_set_is_refused(members, shards_dir, tmp_path):
    run = copy_member(members[0], tmp_path / "labels13")
    meta_path = run / "checkpoints" / "best" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["labels"] = list(LABELS[:13])
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CxrError, match="13 labels"):
        evaluate_main(run_args([members[1], run], shards_dir, tmp_path / "out"))


def test_mixed_resolutions_each_member_at_its_own(members, shards_dir, tmp_path):
    run = copy_member(members[1], tmp_path / "res32")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["resolution"] = 32
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    meta_path = run / "checkpoints" / "best" / "meta.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "resolution": 32}))
    mixed = tmp_path / "mixed"
    assert evaluate_main(run_args([members[0], run], shards_dir, mixed, "--thresholds-from", "none")) == 0
    infos = json.loads((mixed / "members.json").read_text())
    assert [(i["train_resolution"], i["eval_resolution"]) for i in infos] == [(RES, RES), (32, 32)]
    # Reference: each member evaluated alone, in its own evaluator run, at its resolution.
    alone = {}
    for name, r, res in (("a", members[0], RES), ("b", run, 32)):
        assert (
            evaluate_main(
                run_args([r], shards_dir, tmp_path / name, "--thresholds-from", "none", "--resolution", str(res))
            )
            == 0
        )
        frame = pd.read_parquet(tmp_path / name / "predictions.parquet")
        alone[Path(r).name] = frame[frame.member != "ensemble"].sort_values("key")
    frame = pd.read_parquet(mixed / "predictions.parquet")
    for member, ref in alone.items():
        got = frame[frame.member == member].sort_values("key")
        np.testing.assert_allclose(got[list(LABELS)].to_numpy(), ref[list(LABELS)].to_numpy(), atol=1e-6)
    out = tmp_path / "resized"
    assert (
        evaluate_main(
            run_args([members[0], run], shards_dir, out, "--thresholds-from", "none", "--resolution", str(RES))
        )
        == 0
    )
    infos = json.loads((out / "members.json").read_text())
    assert [(i["train_resolution"], i["eval_resolution"]) for i in infos] == [(RES, RES), (32, RES)]


def test_from_predictions_needs_the_thresholds_split(report, tmp_path):
    frame = pd.read_parquet(report / "predictions.parquet")
    only_test = tmp_path / "test_only.parquet"
    frame[frame["split"] == "test"].to_parquet(only_test)
    with pytest.raises(CxrError, match="no predictions for split 'val'"):
        evaluate_main(["--from-predictions", str(only_test), "--out", str(tmp_path / "o"), "--debug"])


@pytest.mark.parametrize(
    "column, value, what", [("Hernia", np.nan, "nan"), ("true_Effusion", 3, "3"), ("Mass", 7.5, "7.5")]
)
def test_bad_values_in_predictions_are_refused_before_writing(report, tmp_path, capsys, column, value, what):
    """NaN scores, non-0/1 labels, probabilities outside [0, 1]: one line naming file, split, member,
    key and label; nothing written to --out."""
    frame = pd.read_parquet(report / "predictions.parquet")
    frame[column] = frame[column].astype(np.float64)
    row = frame.index[(frame["split"] == "test") & (frame["member"] == "member2")][5]
    frame.loc[row, column] = value
    bad = tmp_path / "bad.parquet"
    frame.to_parquet(bad)
    out = tmp_path / "out"
    assert evaluate_main(["--from-predictions", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    label = column.removeprefix("true_")
    for part in (str(bad), "'test'", "'member2'", repr(frame.loc[row, "key"]), label, what):
        assert part in err, (part, err)
    assert not out.exists() or not any(out.iterdir())


def test_empty_split_says_no_samples_and_how_to_go_on(members, shards_dir, tmp_path, capsys):
    shards = tmp_path / "sh_noval"
    shutil.copytree(shards_dir, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["splits"]["val"].update(samples=0, shards=0)  # consistent with the shard list (validated)
    manifest["shards"] = [s for s in manifest["shards"] if s.get("split") != "val"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "out"
    assert (
        evaluate_main(
            [
                "--runs",
                *map(str, members),
                "--shards",
                str(shards),
                "--split",
                "test",
                "--thresholds-from",
                "val",
                "--bootstrap",
                "0",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "split 'val' has no samples — use --thresholds-from none" in err and "no shards" not in err
    assert not out.exists() or not any(out.iterdir())


def test_report_counts_valid_resamples_and_flags_few_positives(report):
    """aucs.csv and report.md say how many of the 200 resamples each CI rests on, and flag labels
    with < 10 positives (counted here from the predictions' ground truth)."""
    aucs = pd.read_csv(report / "aucs.csv")
    truth = _split_frame(report, "test")
    truth = truth[truth["member"] == truth["member"].iloc[0]]
    n_pos = {label: int(truth["true_" + label].sum()) for label in LABELS}
    few = [label for label, n in n_pos.items() if n < 10]
    assert few, "the fixture's 48-image test split should have rare labels"
    rows = aucs[aucs["member"] == "ensemble"].set_index("label")
    assert (rows["n_boot"] == 200).all()
    for label in LABELS:
        assert bool(rows.loc[label, "few_positives"]) == (label in few)
    text = (report / "report.md").read_text()
    assert f"from {int(rows.loc['mean', 'n_valid'])} of 200 valid resamples" in text
    assert "per-label-mean bootstrap" in text
    assert "fewer than 10 positives" in text and all(f"{label} ({n_pos[label]})" in text for label in few)


# --------------------------------------------------------------- distributed ---


@pytest.mark.slow
def test_two_ranks_give_the_same_predictions_as_one(report, members, shards_dir, tmp_path):
    out = tmp_path / "two-ranks"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "cxr.evaluate",
        "--runs",
        *map(str, members),
        "--shards",
        str(shards_dir),
        "--split",
        "test",
        "--thresholds-from",
        "val",
        "--bootstrap",
        "200",
        "--out",
        str(out),
        "--no-figures",
        "--cpu",
        "--threads",
        "1",
    ]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 rank(s)" in proc.stdout  # really two processes, not a silent single one
    one = pd.read_parquet(report / "predictions.parquet")
    two = pd.read_parquet(out / "predictions.parquet")
    assert not two.duplicated(["split", "member", "key"]).any()
    index = ["split", "member", "key"]
    one, two = one.set_index(index).sort_index(), two.set_index(index).sort_index()
    assert one.index.equals(two.index)
    np.testing.assert_allclose(two[list(LABELS)].to_numpy(), one[list(LABELS)].to_numpy(), atol=2e-6)
    assert (two.filter(like="true_") == one.filter(like="true_")).all().all()


@pytest.mark.slow
def test_members_trained_by_train_py(shards_dir, tmp_path):
    """Two tiny members written by cxr/train.py itself (real run dirs) evaluate end to end."""
    runs, procs = [], []
    try:
        for seed in (1, 2):  # both trainings at once: one thread each, 2 cores
            run = tmp_path / f"trained{seed}"
            cmd = [
                sys.executable,
                "-m",
                "cxr.train",
                "--config",
                str(ROOT / "cxr" / "configs" / "tiny.yaml"),
                f"data.shards={shards_dir}",
                f"data.resolution={RES}",
                f"model.stem_size={RES}",
                "data.backend=wds",
                "data.num_threads=0",
                "train.epochs=1",
                "train.threads=1",
                f"train.seed={seed}",
                f"checkpoint.run_dir={run}",
            ]
            with open(tmp_path / f"trained{seed}.err", "wb") as err:  # a file: a full pipe would stall it
                procs.append(
                    subprocess.Popen(
                        cmd,
                        cwd=ROOT,
                        stdout=subprocess.DEVNULL,
                        stderr=err,
                        env={**os.environ, "PYTHONPATH": str(ROOT)},
                    )
                )
            runs.append(run)
        for seed, proc in zip((1, 2), procs):
            proc.wait(timeout=300)
            assert proc.returncode == 0, (tmp_path / f"trained{seed}.err").read_text()[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    out = tmp_path / "report"
    assert (
        evaluate_main(
            [
                "--runs",
                *map(str, runs),
                "--shards",
                str(shards_dir),
                "--bootstrap",
                "100",
                "--out",
                str(out),
                "--no-figures",
            ]
        )
        == 0
    )
    assert _assert_aucs_match_sklearn(out, {"trained1", "trained2", "ensemble"}) >= 3 * 8
    preds = _split_frame(out, "test")
    probs = {m: g.sort_values("key")[list(LABELS)].to_numpy() for m, g in preds.groupby("member")}
    np.testing.assert_allclose(probs["ensemble"], (probs["trained1"] + probs["trained2"]) / 2, atol=1e-15)
    infos = json.loads((out / "members.json").read_text())
    assert [i["seed"] for i in infos] == [1, 2] and all(i["model"] == "cnn" for i in infos)


def test_gpu_decoding_member_is_evaluated_on_cpu(members, shards_dir, tmp_path, capsys):
    run = copy_member(members[0], tmp_path / "gpu-decoded")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["device"] = "gpu"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert evaluate_main(run_args([run], shards_dir, tmp_path / "out", "--thresholds-from", "none")) == 0
    assert "decoding on CPU" in capsys.readouterr().err


def test_coverage_check_catches_missing_and_tolerates_duplicates(shards_dir):
    from cxr.evaluation.inference import check_coverage
    from cxr.evaluation.scores import ScoreSet

    table = pd.read_parquet(json.loads((shards_dir / "manifest.json").read_text())["splits_file"])
    keys = sorted(Path(i).stem for i in table.loc[table["split"] == "test", "image"])

    def scores(ks):
        n = len(ks)
        return ScoreSet(
            keys=np.array(ks, dtype=object), y_true=np.zeros((n, 14), np.uint8), scores={"m": np.zeros((n, 14))}
        )

    check_coverage(scores(keys + keys[:3]).deduplicated(), shards_dir, "test")  # a padded rank
    with pytest.raises(CxrError, match=keys[5]):
        check_coverage(scores(keys[:5] + keys[6:]), shards_dir, "test")
    with pytest.raises(CxrError, match="unexpected"):
        check_coverage(scores(keys + ["99999999_000"]), shards_dir, "test")


# ------------------------------------------------ battery 2: signals, --out, members, tiny val ---


def test_a_stop_signal_during_an_image_decode_stops_the_evaluation_not_marks_the_sample_corrupt(monkeypatch):
    """Seen in a CI run: SIGUSR1 landed while the loader decoded a PNG, the decoder's `except Exception` took the
    stop for a decode failure, and the evaluation exited 1 with "sample … is corrupt" instead of 75. A real
    signal, delivered inside the decode call, must come out as the evaluation's stop."""
    import signal as signals
    from types import SimpleNamespace

    import shards.image_codec
    from cxr import evaluate
    from cxr.data.sample_reader import decode_resize

    def decode_while_signalled(data, codec):
        os.kill(os.getpid(), signals.SIGUSR1)  # Python runs the handler at the next bytecode, inside this call
        for _ in range(1000):
            pass
        raise AssertionError("the stop signal's handler did not run")

    monkeypatch.setattr(shards.image_codec, "decode_grey", decode_while_signalled)
    index = SimpleNamespace(codec="png", shard_paths=["test-000000.tar"], shard=[0], keys=["00000003_000"])
    with evaluate._StopSignals() as stops:
        stops.phase = "inference"
        with pytest.raises(evaluate._Stopped) as stopped:
            decode_resize(b"png bytes", 64, index, 0)
    assert (stopped.value.signum, stopped.value.phase) == (signals.SIGUSR1, "inference")


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_stop_signal_says_what_was_interrupted_writes_nothing_and_exits_requeue(members, shards_dir, tmp_path, sig):
    """Battery 2, 4.6/4.7: a real signal, sent once the evaluator says it has started; the
    earlier report in --out is left exactly as it was, and the exit status is the requeue code."""
    import signal as signals

    from cxr.runs.run_log import EXIT_REQUEUE

    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("an earlier report\n")
    cmd = [sys.executable, "-m", "cxr.evaluate", *run_args(members, shards_dir, out)]
    cmd[cmd.index("--bootstrap") + 1] = "200000"  # an analysis far longer than the signal's way
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        for line in proc.stderr:  # the event: the evaluator's start line (after its lock, before inference)
            seen.append(line)
            if line.startswith("evaluating "):
                break
        else:
            pytest.fail(f"no start line: {''.join(seen)}")
        proc.send_signal(getattr(signals, sig))
        rest = proc.stderr.read()
        rc = proc.wait(timeout=120)
    finally:
        proc.kill()
    last = rest.strip().splitlines()[-1]
    assert rc == EXIT_REQUEUE == 75, rest
    assert last.startswith(f"stopped by {sig} during ") and f"nothing written to {out}" in last, last
    assert "Traceback" not in rest
    assert sorted(p.name for p in out.iterdir()) == ["report.md"]
    assert (out / "report.md").read_text() == "an earlier report\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]  # the temp report is gone


def test_a_second_report_replaces_the_first_as_a_whole(report, tmp_path):
    """Battery 2, 6.2: figures of an earlier evaluation must not stay beside a newer report."""
    out = tmp_path / "stale"
    shutil.copytree(report, out)
    assert (out / "roc.png").is_file()
    assert (
        evaluate_main(
            [
                "--from-predictions",
                str(report / "predictions.parquet"),
                "--split",
                "val",
                "--thresholds-from",
                "none",
                "--bootstrap",
                "0",
                "--no-figures",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert not (out / "roc.png").exists() and not (out / "pr.png").exists()
    assert set(pd.read_csv(out / "aucs.csv")["member"]) >= {"member1", "member2", "ensemble"}
    assert "split `val`" in (out / "report.md").read_text() or "'val'" in (out / "report.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".stale.") and p.is_dir()]


def test_an_out_folder_that_is_not_a_report_is_refused(report, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(CxrError, match=rf"{out}: --out holds files that are not a cxr.evaluate report \(notes.txt\)"):
        evaluate_main(
            [
                "--from-predictions",
                str(report / "predictions.parquet"),
                "--bootstrap",
                "0",
                "--no-figures",
                "--debug",
                "--out",
                str(out),
            ]
        )
    assert (out / "notes.txt").read_text() == "keep me"


def test_second_evaluation_into_a_busy_out_is_refused_naming_the_holder(report, tmp_path):
    """Battery 2, 6.1: a holder process takes the report lock and says so; the evaluation is refused."""
    out = tmp_path / "busy"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from cxr.evaluate import _lock_out; "
            "_lock_out(Path(sys.argv[1])); print('locked', flush=True); sys.stdin.read()",
            str(out),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(
            CxrError,
            match=rf"{out}: another evaluation \(pid {holder.pid} on \S+\) is writing "
            "this report folder",
        ):
            evaluate_main(
                [
                    "--from-predictions",
                    str(report / "predictions.parquet"),
                    "--bootstrap",
                    "0",
                    "--no-figures",
                    "--debug",
                    "--out",
                    str(out),
                ]
            )
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert not out.exists()
    assert (
        evaluate_main(
            [
                "--from-predictions",
                str(report / "predictions.parquet"),
                "--bootstrap",
                "0",
                "--no-figures",
                "--out",
                str(out),
            ]
        )
        == 0
    )  # free again once the holder ended


def test_the_same_run_twice_is_refused_by_any_path(members, shards_dir, tmp_path):
    """Battery 2, 9.6."""
    link = tmp_path / "link"
    link.symlink_to(members[0])
    for twice in (
        [members[0], members[0]],
        [members[0], link],
        [members[0], Path(f"{members[0]}/../{members[0].name}")],
    ):
        with pytest.raises(CxrError, match="run given twice to --runs .* an ensemble would count it twice"):
            evaluate_main(run_args([*twice, members[1]], shards_dir, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_unfinished_member_is_named_in_stderr_members_json_and_report(members, shards_dir, tmp_path, capsys):
    """Battery 2, 9.4: a preempted run (status.json as training writes it, docs/run-dir.md)."""
    run = copy_member(members[0], tmp_path / "unf")
    (run / "status.json").write_text(
        json.dumps(
            {
                "state": "preempted",
                "epoch": 1,
                "step_in_epoch": 0,
                "global_step": 3,
                "exit_code": 75,
                "time": "2026-12-04T21:00:00+00:00",
            }
        )
    )
    out = tmp_path / "out"
    assert evaluate_main(run_args([run, members[1]], shards_dir, out)) == 0
    err = capsys.readouterr().err
    assert "warning: member unf" in err and "is unfinished" in err and "'preempted'" in err
    infos = {m["name"]: m for m in json.loads((out / "members.json").read_text())}
    assert infos["unf"]["run_status"]["state"] == "preempted" and infos["member2"]["run_status"] is None
    assert "member unf" in (out / "report.md").read_text() and "unfinished" in (out / "report.md").read_text()


def test_threshold_split_lacking_classes_is_warned_naming_the_labels(report, tmp_path, capsys):
    """Battery 2, 10.1: the labels named are those with no positive (or no negative) in the
    threshold split, counted here from predictions.parquet's truth columns by pandas."""
    frame = pd.read_parquet(report / "predictions.parquet")
    val = frame[(frame["split"] == "val") & (frame["member"] == "ensemble")]
    positives = {label: int(val[f"true_{label}"].sum()) for label in LABELS}
    none = [label for label, n in positives.items() if n == 0]
    every = [label for label, n in positives.items() if n == len(val)]
    lacking = none + every
    assert lacking, "the fixture's 48-image val split should lack positives of rare labels"
    assert (
        evaluate_main(
            [
                "--from-predictions",
                str(report / "predictions.parquet"),
                "--bootstrap",
                "0",
                "--no-figures",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    err = [line for line in capsys.readouterr().err.splitlines() if "--thresholds-from val" in line]
    assert len(err) == 1 and f"AUROC undefined for {len(lacking)} of 14 labels" in err[0], err
    gaps = "; ".join(
        [f"no positive image of {', '.join(none)}"] * bool(none)
        + [f"no negative image of {', '.join(every)}"] * bool(every)
    )
    assert f"{gaps} (AUROC undefined" in err[0], (gaps, err[0])
    assert "the tuned thresholds rest on it" in (tmp_path / "out" / "report.md").read_text()


def test_shards_default_to_the_runs_data_shards(report, members, shards_dir, tmp_path, capsys):
    """Every run records data.shards: without --shards the evaluator reads them, says so, and predicts
    what it predicted with --shards given."""
    out = tmp_path / "no-shards"
    assert (
        evaluate_main(
            [
                "--runs",
                *map(str, members),
                "--split",
                "test",
                "--thresholds-from",
                "val",
                "--bootstrap",
                "0",
                "--no-figures",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert f"shards: {shards_dir} (data.shards of {members[0]}" in capsys.readouterr().err
    pd.testing.assert_frame_equal(
        pd.read_parquet(out / "predictions.parquet"), pd.read_parquet(report / "predictions.parquet")
    )
    assert evaluate_main(["--runs", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert (
        f"{tmp_path / 'config.yaml'}: run config not found — is {tmp_path} a training run dir"
        in capsys.readouterr().err
    )
