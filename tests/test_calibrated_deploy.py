"""Calibrated probabilities where users meet them: `python -m cxr.tools.export` packs the evaluator's
calibration.json (by default the one next to --thresholds), the page (cxr/web/calibrate.js) and
`cxr-predict` show the calibrated probability and say so, and --no-calibration keeps the
operating-point scale.

References are independent of cxr's code: each map written out from its stored parameters
(σ(a·logit p + b), σ(logit p / T), the SPEC's x/(2o) scale) in NumPy here, and, for the page, the
same formulas against what calibrate.js computes in node / Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from web_page import web_tools  # noqa: F401 — Chromium + the page's npm files (tests/web_page.py)

from cxr.evaluation import calibration as cal
from cxrbase.errors import CxrError
from cxrbase.labels import LABELS

ROOT = Path(__file__).resolve().parents[1]
CLIP = 1e-7


# ------------------------------------------------------------------ independent references ---


def hand_map(p, entry: dict) -> np.ndarray:
    """One label's map from its stored parameters, written out (not cxr.evaluation.calibration.apply_map)."""
    p = np.asarray(p, dtype=np.float64)
    q = np.minimum(np.maximum(p, CLIP), 1 - CLIP)
    x = np.log(q / (1 - q))
    if entry["method"] == "none":
        return p
    z = x / entry["temperature"] if entry["method"] == "temperature" else entry["a"] * x + entry["b"]
    return 1.0 / (1.0 + np.exp(-z))


def hand_scale(x, o) -> np.ndarray:
    """SPEC's operating-point scale, written out."""
    x, o = np.asarray(x, np.float64), np.asarray(o, np.float64)
    return np.where(x <= o, x / (2 * o), 1 - (1 - x) / (2 * (1 - o)))


def assert_mapped(shown: np.ndarray, raw: np.ndarray, fn) -> None:
    """predictions.csv prints raw_<label> to 8 decimals and the label to 6: the shown value must lie in
    fn's image of the raw value's rounding interval (fn is increasing), widened by the label's rounding."""
    lo = fn(np.clip(raw - 5e-9, 0, 1)) - 5.1e-7
    hi = fn(np.clip(raw + 5e-9, 0, 1)) + 5.1e-7
    bad = ~((shown >= lo) & (shown <= hi))
    assert not bad.any(), (shown[bad], lo[bad], hi[bad])


def mapped(doc: dict):
    """[n, L] raw → [n, L] each label's map by hand."""
    return lambda x: np.column_stack([hand_map(x[:, j], doc["labels"][label]) for j, label in enumerate(LABELS)])


def hand_document(member: str = "ensemble") -> dict:
    """A calibration.json of the evaluator's format whose labels use every method with non-trivial
    parameters (a real fit on a tiny val split mostly keeps `none`)."""
    maps = {}
    for i, label in enumerate(LABELS):
        method = cal.METHODS[i % 3]
        maps[label] = {
            "method": method,
            "temperature": [0.45, 2.3, 1.7][i % 3] + 0.01 * i,
            "a": [1.0, 0.6, 1.8][i % 3] + 0.01 * i,
            "b": [0.0, -1.2, 0.45][i % 3] - 0.02 * i,
            "n": 40,
            "n_pos": 9,
            "cv_logloss": dict.fromkeys(cal.METHODS, 0.5),
        }
    return cal.calibration_document(maps, member, "val", 40)


def probe_probabilities() -> np.ndarray:
    """Edges (0, 1, inside and outside the clip), the middle, and a spread of float32 values."""
    rng = np.random.default_rng(4)
    edges = [0.0, 1.0, 1e-12, 1e-7, 3e-7, 0.5, 1 - 1e-7, 1 - 1e-12, 1e-4, 0.9999]
    spread = rng.beta(0.4, 0.8, 150).astype(np.float32).astype(np.float64)
    return np.r_[edges, spread]


# ------------------------------------------------------------------ calibrate.js in node ---


def _node(script: str) -> None:
    if not shutil.which("node"):
        pytest.skip("node missing: install Node.js")
    subprocess.run(["node", "-e", script], check=True, timeout=60)


def test_page_maps_equal_apply_map_and_the_formulas(tmp_path):
    """calibrate.js (the page's mapping, run in node) = cxr.evaluation.calibration.apply_map = the formulas by hand,
    per method on probabilities at and beyond the clip; the rows' marks are the operating points mapped the
    same way, and a finding is positive exactly when the model's probability reaches its operating point."""
    doc = hand_document()
    p = probe_probabilities()
    ops = np.linspace(0.05, 0.8, len(LABELS))
    probs = p[: len(LABELS)][::-1].copy()
    probs[3] = ops[3]  # exactly at the operating point: positive
    thr_cal = {"operating_points": ops.tolist(), "probabilities": "calibrated", "probabilities_note": "n"}
    thr_op = {"operating_points": ops.tolist(), "probabilities": "operating-point"}
    (tmp_path / "in.json").write_text(
        json.dumps({"doc": doc, "p": p.tolist(), "probs": probs.tolist(), "cal": thr_cal, "op": thr_op})
    )
    _node(f"""
        globalThis.window = globalThis;
        require({json.dumps(str(ROOT / "cxr" / "web" / "calibrate.js"))});
        const fs = require("fs");
        const d = JSON.parse(fs.readFileSync({json.dumps(str(tmp_path / "in.json"))}, "utf8"));
        const labels = Object.keys(d.doc.labels);
        const maps = {{}};
        for (const label of labels) maps[label] = d.p.map((x) => CxrCalibration.applyMap(x, d.doc.labels[label], d.doc.clip));
        const out = {{ maps, calibrated: CxrCalibration.rows(d.probs, labels, d.cal, d.doc),
                      scale: CxrCalibration.rows(d.probs, labels, d.op, null),
                      old: CxrCalibration.rows(d.probs, labels, {{ operating_points: d.op.operating_points }}, null) }};
        fs.writeFileSync({json.dumps(str(tmp_path / "out.json"))}, JSON.stringify(out));
    """)
    js = json.loads((tmp_path / "out.json").read_text())
    for label, entry in doc["labels"].items():
        want = hand_map(p, entry)
        np.testing.assert_allclose(js["maps"][label], want, rtol=1e-12, atol=1e-15, err_msg=label)
        np.testing.assert_allclose(cal.apply_map(p, entry), want, rtol=1e-12, atol=1e-15, err_msg=label)
    assert {e["method"] for e in doc["labels"].values()} == set(cal.METHODS)
    for i, (label, row) in enumerate(zip(LABELS, js["calibrated"])):
        entry = doc["labels"][label]
        assert row["name"] == label and row["kind"] == "calibrated"
        np.testing.assert_allclose(row["shown"], hand_map(probs[i], entry), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(row["mark"], hand_map(ops[i], entry), rtol=1e-12, atol=1e-15)
        assert row["positive"] == bool(probs[i] >= ops[i])
        assert row["positive"] == bool(row["shown"] >= row["mark"])  # the mark separates the same findings
    assert js["calibrated"][3]["positive"]
    # without calibration (and for a package exported before it: no "probabilities" key) the old scale
    for rows in (js["scale"], js["old"]):
        assert [r["kind"] for r in rows] == ["operating-point"] * len(LABELS)
        np.testing.assert_allclose([r["shown"] for r in rows], hand_scale(probs, ops), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose([r["mark"] for r in rows], 0.5, atol=1e-12)
        assert [r["positive"] for r in rows] == list(probs >= ops)


def test_page_refuses_a_calibrated_package_without_its_maps(tmp_path):
    _node(f"""
        globalThis.window = globalThis;
        require({json.dumps(str(ROOT / "cxr" / "web" / "calibrate.js"))});
        let msg = "";
        try {{ CxrCalibration.rows([0.5], ["A"], {{ operating_points: [0.5], probabilities: "calibrated" }}, null); }}
        catch (e) {{ msg = e.message; }}
        let unknown = "";
        try {{ CxrCalibration.applyMap(0.5, {{ method: "isotonic" }}); }} catch (e) {{ unknown = e.message; }}
        require("fs").writeFileSync({json.dumps(str(tmp_path / "o.json"))}, JSON.stringify({{ msg, unknown }}));
    """)
    got = json.loads((tmp_path / "o.json").read_text())
    assert "calibration.json is missing" in got["msg"] and "isotonic" in got["unknown"]


# ------------------------------------------------------------------ the calibration file checks ---


def test_calibration_for_checks_member_and_labels(tmp_path):
    cal.write_calibration(tmp_path, hand_document("m1"))
    path = tmp_path / cal.CALIBRATION_FILE
    assert cal.calibration_for(path, ("m1", "ensemble"), LABELS)["member"] == "m1"
    with pytest.raises(CxrError, match=r"calibration.json: maps fitted for score set 'm1', not 'ensemble'"):
        cal.calibration_for(path, ("ensemble",), LABELS)
    with pytest.raises(CxrError, match="no map for"):
        cal.calibration_for(path, ("m1",), [*LABELS, "Fracture"])
    text = cal.describe(hand_document())
    assert "'val' (40 images)" in text and "none 5, temperature 5, platt 4 of 14" in text
    assert cal.beside(tmp_path / "thresholds.json") == path and cal.beside(tmp_path / "x" / "t.json") is None


def test_calibration_json_is_strict_json_for_the_page(tmp_path):
    """A label with one class in the fitting split has no cross-validated log-loss: written as null, not
    NaN (which the browser's JSON.parse rejects), and read back as a valid map."""
    rng = np.random.default_rng(0)
    p = rng.uniform(0.05, 0.95, (60, 2))
    y = np.c_[(rng.uniform(size=60) < p[:, 0]), np.zeros(60)]
    maps = cal.fit_calibration(y, p, ["A", "B"])
    path = cal.write_calibration(tmp_path, cal.calibration_document(maps, "ensemble", "val", 60))

    def no_constants(name):
        raise ValueError(f"non-standard JSON constant {name}")

    strict = json.loads(path.read_text(), parse_constant=no_constants)
    assert strict["labels"]["B"]["method"] == "none" and strict["labels"]["B"]["cv_logloss"]["platt"] is None
    assert cal.read_calibration(path)["labels"]["A"]["method"] in cal.METHODS


# ------------------------------------------------------------------ export and cxr-predict on runs ---


@pytest.fixture(scope="module")
def calibrated(export_runs, tmp_path_factory):
    """export_runs' two members and their report (python -m cxr.evaluate: thresholds and calibration
    fitted on val, its default), a hand-made calibration.json of the ensemble, a few phantom PNGs."""
    root = tmp_path_factory.mktemp("calibrated")
    report = export_runs["report"]
    assert json.loads((report / "calibration.json").read_text())["fitted_on"] == "val"
    (root / "hand").mkdir()
    cal.write_calibration(root / "hand", hand_document())
    images = root / "images"
    images.mkdir()
    for png in sorted((export_runs["root"] / "synth" / "images").glob("*.png"))[:6]:
        shutil.copyfile(png, images / png.name)
    return {**export_runs, "cal_report": report, "hand": root / "hand" / "calibration.json", "images": images}


def _export(runs: dict, out: Path, *extra: str) -> int:
    from cxr.tools.export import main as export_main

    member_args = [a for m in runs["members"] for a in ("--run", str(m))]
    return export_main([*member_args, "--ood", str(runs["gate"]), "--out", str(out), *extra])


@pytest.mark.integration
@pytest.mark.usefixtures("one_torch_thread")
def test_export_packs_the_reports_calibration_by_default(calibrated, tmp_path, capsys):
    report = calibrated["cal_report"]
    out = tmp_path / "pkg"
    assert _export(calibrated, out, "--thresholds", str(report / "thresholds.json")) == 0
    assert "shows calibrated by the evaluator's maps" in capsys.readouterr().out
    packed = json.loads((out / "calibration.json").read_text())
    fitted = json.loads((report / "calibration.json").read_text())
    assert packed["labels"] == fitted["labels"] and packed["fitted_on"] == "val" and packed["member"] == "ensemble"
    assert packed["source"] == str(report / "calibration.json")
    thr = json.loads((out / "thresholds.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert thr["probabilities"] == "calibrated" and "'val'" in thr["probabilities_note"]
    assert "calibration.json" in manifest["files"] and manifest["probabilities"] == thr["probabilities_note"]
    # --no-calibration: today's operating-point scale, and no stale maps left from the export before
    assert _export(calibrated, out, "--thresholds", str(report / "thresholds.json"), "--no-calibration") == 0
    thr = json.loads((out / "thresholds.json").read_text())
    assert thr["probabilities"] == "operating-point" and not (out / "calibration.json").exists()
    assert "calibration.json" not in json.loads((out / "manifest.json").read_text())["files"]
    # maps of another score set (one member's) are refused for the ensemble, naming the file
    cal.write_calibration(tmp_path, hand_document("m1"))
    assert _export(calibrated, tmp_path / "bad", "--calibration", str(tmp_path / "calibration.json")) == 2
    assert "score set 'm1', not 'ensemble'" in capsys.readouterr().err


def _predict(*argv: str) -> pd.DataFrame:
    from cxr.tools.predict import main as predict_main

    out = Path(argv[argv.index("--out") + 1])
    assert predict_main(["--no-progress", *argv]) == 0
    return pd.read_csv(out / "predictions.csv")


@pytest.mark.integration
@pytest.mark.usefixtures("one_torch_thread")
def test_predict_shows_the_packages_calibrated_probabilities(calibrated, tmp_path, capsys):
    """cxr-predict on a package exported with maps of every method: label columns = the maps by hand on
    the raw probabilities, the `probabilities` column and the summary say so; decisions unchanged."""
    pkg = tmp_path / "pkg"
    thresholds = str(calibrated["cal_report"] / "thresholds.json")
    assert _export(calibrated, pkg, "--thresholds", thresholds, "--calibration", str(calibrated["hand"])) == 0
    got = _predict("--model", str(pkg), str(calibrated["images"]), "--out", str(tmp_path / "o"))
    assert "label columns: calibrated by the evaluator's maps" in capsys.readouterr().out
    doc = json.loads((pkg / "calibration.json").read_text())
    ops = np.asarray(json.loads((pkg / "thresholds.json").read_text())["operating_points"])
    raw = got[[f"raw_{label}" for label in LABELS]].to_numpy()
    assert len(got) == 6 and (got["probabilities"] == "calibrated").all()
    assert_mapped(got[list(LABELS)].to_numpy(), raw, mapped(doc))
    accepted = (got["gate"] != "rejected").to_numpy()
    decisions = got.loc[accepted, [f"{label}_decision" for label in LABELS]].to_numpy()
    np.testing.assert_array_equal(decisions, (raw[accepted] >= ops).astype(int))
    # the flag keeps today's scale on the same package
    old = _predict("--model", str(pkg), str(calibrated["images"]), "--out", str(tmp_path / "o2"), "--no-calibration")
    assert (old["probabilities"] == "operating-point").all()
    assert_mapped(old[list(LABELS)].to_numpy(), raw, lambda x: hand_scale(x, ops))
    np.testing.assert_allclose(old[[f"raw_{label}" for label in LABELS]].to_numpy(), raw, atol=1e-8)


@pytest.mark.integration
@pytest.mark.usefixtures("one_torch_thread")
def test_predict_on_runs_uses_the_calibration_next_to_thresholds(calibrated, tmp_path, capsys):
    report = calibrated["cal_report"]
    runs = [a for m in calibrated["members"] for a in ("--model", str(m))]
    got = _predict(
        *runs, "--thresholds", str(report / "thresholds.json"), str(calibrated["images"]), "--out", str(tmp_path / "o")
    )
    doc = json.loads((report / "calibration.json").read_text())
    raw = got[[f"raw_{label}" for label in LABELS]].to_numpy()
    assert (got["probabilities"] == "calibrated").all()
    assert_mapped(got[list(LABELS)].to_numpy(), raw, mapped(doc))
    # --calibration names the file; one member's maps for the two-member ensemble are refused
    hand = _predict(
        *runs, "--calibration", str(calibrated["hand"]), str(calibrated["images"]), "--out", str(tmp_path / "o2")
    )
    np.testing.assert_allclose(hand[[f"raw_{label}" for label in LABELS]].to_numpy(), raw, atol=1e-8)
    assert_mapped(hand[list(LABELS)].to_numpy(), raw, mapped(hand_document()))
    capsys.readouterr()
    cal.write_calibration(tmp_path, hand_document("m1"))
    from cxr.tools.predict import main as predict_main

    rc = predict_main(
        [
            "--no-progress",
            *runs,
            "--calibration",
            str(tmp_path / "calibration.json"),
            str(calibrated["images"]),
            "--out",
            str(tmp_path / "o3"),
        ]
    )
    assert rc == 2 and "score set 'm1', not 'ensemble'" in capsys.readouterr().err


# ------------------------------------------------------------------ the page in Chromium ---


class _Handler(SimpleHTTPRequestHandler):
    seen: list = []

    def do_GET(self):
        self.seen.append(self.path.split("?")[0].lstrip("/"))
        super().do_GET()

    def log_message(self, *args):
        pass


def _page(site: Path, image: str, tools: dict) -> tuple[dict, list[str]]:
    handler = type("H", (_Handler,), {"seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {**os.environ, "PLAYWRIGHT_CORE": tools["playwright"], "CHROMIUM": tools["chromium"]}
        url = f"http://127.0.0.1:{server.server_address[1]}/index.html?image={image}"
        cmd = ["node", str(ROOT / "tests" / "web_driver.cjs"), url]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    finally:
        server.shutdown()
        thread.join()
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), handler.seen


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_page_shows_calibrated_probabilities_and_says_so(calibrated, tmp_path, web_tools):  # noqa: F811
    tools = web_tools  # Chromium, node and build/npm (installed by scripts/web-deps.sh when missing)
    thresholds = str(calibrated["cal_report"] / "thresholds.json")
    image = sorted(calibrated["images"].glob("*.png"))[0]
    for kind, extra in (("calibrated", ["--calibration", str(calibrated["hand"])]), ("operating-point", [])):
        site = tmp_path / kind
        flag = [] if extra else ["--no-calibration"]
        assert (
            _export(calibrated, tmp_path / f"pkg-{kind}", "--thresholds", thresholds, *extra, *flag, "--web", str(site))
            == 0
        )
        shutil.copyfile(image, site / "x.png")
        result, seen = _page(site, "x.png", tools)
        assert result["state"] == "done", result
        assert result["legend"]["mapping"] == kind
        thr = json.loads((site / "thresholds.json").read_text())
        ops = dict(zip(LABELS, thr["operating_points"]))
        rows = {r["label"]: r for r in result["rows"]}
        assert sorted(rows) == sorted(LABELS) and all(r["mapping"] == kind for r in rows.values())
        p = np.array([float(rows[label]["prob"]) for label in LABELS])
        o = np.array([ops[label] for label in LABELS])
        if kind == "calibrated":
            doc = hand_document()
            assert "calibrated probability" in result["legend"]["text"] and "'val'" in result["legend"]["text"]
            want = [hand_map(p[j], doc["labels"][label]) for j, label in enumerate(LABELS)]
            marks = [hand_map(o[j], doc["labels"][label]) for j, label in enumerate(LABELS)]
            assert "calibration.json" in seen and "calibrate.js" in seen
        else:
            assert "not a calibrated probability" in result["legend"]["text"]
            want, marks = hand_scale(p, o), np.full(len(LABELS), 0.5)
            assert "calibration.json" not in seen and not (site / "calibration.json").exists()
        # data-prob is printed to 9 digits: the shown value follows it to ~1e-7
        np.testing.assert_allclose([float(rows[label]["calibrated"]) for label in LABELS], want, atol=1e-6)
        np.testing.assert_allclose([float(rows[label]["mark"]) for label in LABELS], marks, atol=1e-6)
        assert [rows[label]["positive"] == "true" for label in LABELS] == list(p >= o)
        shown = [float(r["calibrated"]) for r in result["rows"]]
        assert shown == sorted(shown, reverse=True)
