"""Helpers of `make demo` (scripts/demo.sh) for the steps no cxr command does on its own.

    python scripts/demo_tour.py outliers --splits SPLITS --images DIR --out DIR --n N
    python scripts/demo_tour.py verdicts --package PKG --images DIR --out DIR
    python scripts/demo_tour.py dicoms   --images FILE... --out DIR
    python scripts/demo_tour.py site     --entry SYNTH/Data_Entry_2017.csv --out DIR
    python scripts/demo_tour.py web      --site SITE --images FILE... --out DIR
    python scripts/demo_tour.py index    --demo DEMO [--total-s S]

They work on the commands' outputs only (splits tables, the exported ONNX package and its
preprocess.json, report tables), never on cxr internals, so the tour keeps working while those
change. The non-X-rays are made as tests/ood_data.py makes them for the gate's own test
(imported from there: one definition of "natural-looking outlier" for the test and the tour), and
the DICOMs as tests/dicom_data.py writes its fixtures.
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import os
import shutil
import subprocess
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from dicom_data import dicom_bytes, structured_report  # noqa: E402
from ood_data import TEST_KINDS, digits, textures  # noqa: E402

LABELS = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Effusion",
    "Emphysema",
    "Fibrosis",
    "Hernia",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pleural_Thickening",
    "Pneumonia",
    "Pneumothorax",
)
NOT_ACCURACY = (
    "A demonstration of the machinery, not of accuracy: every classifier here is a tiny CNN "
    "trained for a few seconds on synthetic phantoms, so what it says about a real X-ray means "
    "nothing about disease."
)


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    tmp = path.with_name(path.name + ".tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------ outliers ---
def _grey(path: Path, res: int) -> np.ndarray:
    """uint8 [res, res] as the page makes it: PIL "L", then the loader's resize (cxr.data.shard_index)."""
    from cxr.data.shard_index import to_resolution

    with Image.open(path) as im:
        return to_resolution(im.convert("L"), res)


def cmd_outliers(args) -> int:
    """Held-out real X-rays (the test split, never seen by the gate) and as many non-X-rays of each kind."""
    splits = pd.read_parquet(args.splits)
    test = sorted(str(k) for k in splits.loc[splits["split"] == "test", "image"])[: args.n]
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    rows = []
    res = args.resolution
    xrays = []
    for name in test:
        src = Path(args.images) / (name if name.endswith(".png") else f"{name}.png")
        shutil.copyfile(src, out / f"real_{src.name}")
        rows.append((f"real_{src.name}", "real X-ray"))
        xrays.append(_grey(src, res))
    n = len(test)
    made = {
        "texture": textures(n, 1, res=res),
        "digits": digits(n, 2, res=res),
        "inverted X-ray": 255 - np.stack(xrays),
        "X-ray rotated 90°": np.rot90(np.stack(xrays), 1, (1, 2)),
    }
    for category, stack in made.items():
        slug = category.split()[0].lower()
        for i, px in enumerate(stack):
            name = f"{slug}_{i:03d}.png"
            Image.fromarray(np.ascontiguousarray(px)).save(out / name)
            rows.append((name, category))
    # the bench's held-out kinds (bench/ood_gate.py), saved at their own size and colour: the gate
    # sees them through the page's path (grey, the loader's Lanczos resize)
    for j, (category, make) in enumerate(TEST_KINDS.items()):
        slug = category.replace(" ", "-").lower()
        for i, im in enumerate(make(n, 100 + j)):
            name = f"{slug}_{i:03d}.png"
            im.save(out / name)
            rows.append((name, category))
        made[category] = None
    _write_csv(out / "images.csv", pd.DataFrame(rows, columns=["image", "category"]))
    print(f"outliers: {n} held-out real X-rays and {len(rows) - n} non-X-rays ({', '.join(made)}) → {out}")
    return 0


# ------------------------------------------------------------------ verdicts ---
def _pixels(path: Path, res: int, mean: float, std: float) -> np.ndarray:
    """[1,1,res,res] float32 as the loader and the page make it (PIL L, Lanczos, (x/255 − mean)/std)."""
    x = (_grey(path, res).astype(np.float32) - np.float32(mean * 255)) / np.float32(std * 255)
    return x[None, None]


def cmd_verdicts(args) -> int:
    """Score every image with the exported gate (ood.onnx, its preprocess.json and threshold)."""
    import onnxruntime as ort

    package, images, out = Path(args.package), Path(args.images), Path(args.out)
    gate_cfg = json.loads((package / "preprocess.json").read_text())["ood"]
    session = ort.InferenceSession(str(package / "ood.onnx"), providers=["CPUExecutionProvider"])
    table = pd.read_csv(images / "images.csv")
    scores = [
        float(
            session.run(
                None, {"image": _pixels(images / name, gate_cfg["resolution"], gate_cfg["mean"], gate_cfg["std"])}
            )[0][0, 0]
        )
        for name in table["image"]
    ]
    table["score"] = scores
    table["threshold"] = gate_cfg["threshold"]
    table["verdict"] = np.where(table["score"] > gate_cfg["threshold"], "rejected", "accepted")
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "verdicts.csv", table)
    summary = (
        table.groupby("category", sort=False)["verdict"]
        .value_counts()
        .unstack(fill_value=0)
        .reindex(columns=["accepted", "rejected"], fill_value=0)
        .reset_index()
    )
    summary.insert(1, "images", summary["accepted"] + summary["rejected"])
    summary["rejected %"] = (100 * summary["rejected"] / summary["images"]).round(0).astype(int)
    _write_csv(out / "summary.csv", summary)
    lines = [
        "# OOD gate verdicts: real X-rays vs non-X-rays",
        "",
        f"Gate: `{package}/ood.onnx` (score = Mahalanobis distance of the autoencoder's 1 − SSIM and the "
        f"image's intensity and layout statistics at {gate_cfg['resolution']} px from the real NIH train "
        f"images); an image is rejected when its score exceeds {gate_cfg['threshold']:.4f} (a percentile of "
        f"the real train + val images' cross-fitted scores).",
        "",
        "| images | n | accepted | rejected | rejected % |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r.category} | {r.images} | {r.accepted} | {r.rejected} | {r[-1]} |" for r in summary.itertuples()]
    lines += [
        "",
        "The real X-rays are the NIH sample's held-out test images (the gate never saw them). "
        "The non-X-rays are made as tests/ood_data.py makes them: textures, digits, inverted and rotated "
        "X-rays (the kinds the gate's design was tuned on), then the kinds bench/ood_gate.py holds out "
        "(plots, screenshots, documents, photos, CT slices, limb radiographs, noise, checkerboards, "
        "colour blobs).",
    ]
    _write_text(out / "verdicts.md", "\n".join(lines) + "\n")
    print("\n".join(lines[4 : 4 + len(summary) + 2]))
    real = summary.set_index("category").loc["real X-ray"]
    others = summary[summary["category"] != "real X-ray"]
    print(
        f"ood verdicts: {real.accepted} of {real.images} real X-rays accepted, "
        f"{others['rejected'].sum()} of {others['images'].sum()} non-X-rays rejected → {out}/verdicts.md"
    )
    return 0


# ------------------------------------------------------------------ web ---
class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def cmd_web(args) -> int:
    """Serve SITE on 127.0.0.1, open each image through the page (?image=NAME) in headless Chromium."""
    site, out = Path(args.site), Path(args.out)
    if not (site / "index.html").is_file():
        raise SystemExit(f"{site}: no index.html — export the page first (python -m cxr.tools.export ... --web {site})")
    for image in args.images:
        if not Path(image).is_file():
            raise SystemExit(f"{image}: no such file — pass PNG or JPEG files")
    if not shutil.which("node"):
        raise SystemExit("node not found — install Node.js, then `make web-deps`")
    if not Path(args.chromium).is_file():
        raise SystemExit(f"{args.chromium}: no chromium — `make web-deps` installs it (root), or pass --chromium")
    if not (Path(args.playwright) / "package.json").is_file():
        raise SystemExit(f"{args.playwright}: playwright-core missing — run `make web-deps`")
    out.mkdir(parents=True, exist_ok=True)
    for image in args.images:
        if Path(image).resolve() != (site / Path(image).name).resolve():
            shutil.copyfile(image, site / Path(image).name)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/index.html"
    env = {**os.environ, "PLAYWRIGHT_CORE": args.playwright, "CHROMIUM": args.chromium}
    results = []
    try:
        for image in args.images:
            name = Path(image).name
            shot = out / f"{Path(name).stem}.png"
            done = subprocess.run(
                ["node", str(ROOT / "tests" / "web_driver.cjs"), f"{url}?image={name}", str(shot)],
                capture_output=True,
                text=True,
                env=env,
                timeout=args.timeout,
            )
            if done.returncode != 0:
                raise SystemExit(f"{image}: the page did not finish in Chromium — {done.stderr.strip()[-600:]}")
            page = json.loads(done.stdout.strip().splitlines()[-1])
            top = sorted(page["rows"], key=lambda r: -float(r["calibrated"]))[:3]
            results.append(
                {
                    "image": name,
                    "screenshot": shot.name,
                    "state": page["state"],
                    "ood_score": float(page["ood"]) if page.get("ood") else None,
                    "mapping": (page.get("legend") or {}).get("mapping"),
                    "top": [
                        {"label": r["label"], "prob": float(r["prob"]), "calibrated": float(r["calibrated"])}
                        for r in top
                    ],
                }
            )
            said = ", ".join(f"{r['label']} {r['calibrated']:.2f}" for r in results[-1]["top"]) or page["text"]
            print(f"page: {name}: {page['state']} — {said} ({(page.get('legend') or {}).get('mapping')} scale)")
    finally:
        server.shutdown()
        thread.join()
    doc = {"note": NOT_ACCURACY, "results": results} if args.demo_note else {"site": str(site), "results": results}
    _write_text(out / "results.json", json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    print(f"web: {len(results)} image(s) through the page, screenshots → {out}")
    return 0


# ------------------------------------------------------------------ a second site ---
# A second phantom "site" as another hospital's data set would write its labels: its own name for
# one finding, and one finding it does not record at all. Mapping its names onto the model's is
# the harmonisation step: a label the site lacks becomes an empty column (unknown, never negative).
SITE_NAMES = {"Effusion": "Pleural Effusion"}  # canonical name → the site's own name
SITE_MISSING = ("Hernia",)  # findings the site does not record


def cmd_site(args) -> int:
    entry = pd.read_csv(args.entry)
    findings = entry["Finding Labels"].str.split("|")
    own = pd.DataFrame({"image": entry["Image Index"]})
    for label in LABELS:
        if label not in SITE_MISSING:
            own[SITE_NAMES.get(label, label)] = findings.map(lambda names, label=label: int(label in names))
    own["patient"] = entry["Patient ID"]
    out = Path(args.out)
    _write_csv(out / "site_labels.csv", own)  # the site's own naming
    mapped = own.rename(columns={v: k for k, v in SITE_NAMES.items()})
    for label in SITE_MISSING:
        mapped.insert(len(mapped.columns) - 1, label, "")  # unknown for every image
    _write_csv(out / "labels.csv", mapped)  # mapped onto the canonical names: what split/pack read
    renamed = ", ".join(f"{theirs} → {ours}" for ours, theirs in SITE_NAMES.items())
    print(
        f"site: {len(own)} images; label mapping {renamed}; not recorded by the site (unknown): "
        f"{', '.join(SITE_MISSING)} → {out / 'labels.csv'}"
    )
    return 0


# ------------------------------------------------------------------ index ---
# (stage, path relative to DEMO, what it shows)
OUTPUTS = [
    ("phantoms", "synth/images", "the synthetic phantom chest X-rays (PNG) the classifiers learn from"),
    ("phantoms", "synth/boxes.csv", "where the phantom generator drew each finding (NIH BBox_List layout)"),
    ("phantoms", "shards/manifest.json", "the packed, verified WebDataset shards: counts, prevalence, sha256"),
    ("nih", "sample/splits.parquet", "the 130 real NIH images split by patient (60/20/20)"),
    ("nih", "shards-sample/manifest.json", "the real images packed as shards (originals + 64 px derived copies)"),
    (
        "ensemble",
        "report/report.md",
        "the ensemble report: per-label test AUROC of each member and of the ensemble, with bootstrap CIs",
    ),
    ("ensemble", "report/aucs.csv", "the same AUROCs as a table"),
    ("external", "external/site_labels.csv", "the second site's labels as it names them (Pleural Effusion, no Hernia)"),
    (
        "external",
        "external/report/report.md",
        "external validation: the ensemble on the second site, internal and external AUROC side by side",
    ),
    ("external", "external/report/cross_site.csv", "the same comparison as a table, with the dropped labels"),
    ("ensemble", "report/roc.png", "ROC curves of the ensemble per label"),
    ("ensemble", "report/thresholds.json", "per-label thresholds tuned on validation (exported with the model)"),
    (
        "sample",
        "sample/report/report.md",
        "the phantom-trained ensemble on the real test X-rays: calibration (maps fitted on the sample's val split), "
        "subgroups by sex, age and view, operating points — the sections work on real data; the numbers mean little",
    ),
    ("sample", "sample/report/reliability.png", "reliability diagrams on the real sample, before and after"),
    ("ensemble", "runs/member1/metrics.csv", "member 1's per-epoch training log (2 processes, gloo)"),
    ("ensemble", "runs/member2/metrics.csv", "member 2's (other seed, learning rate and augmentation)"),
    (
        "resolution",
        "resolution/report/ablation.md",
        "the resolution study: AUROC per label at each resolution, "
        "ΔAUROC vs the lowest with DeLong's paired test (Holm-adjusted)",
    ),
    ("resolution", "resolution/report/ablation.csv", "the same comparison as a table (variant × label)"),
    (
        "resolution",
        "resolution/report/auroc_vs_resolution.png",
        "test AUROC vs resolution with 95 % CIs, one panel per label: the fine-detail label (Nodule) gains",
    ),
    ("resolution", "resolution/report/runs.csv", "per run: micro-batch, images/s, s/epoch, peak memory"),
    (
        "explain",
        "explain/index.html",
        "Grad-CAM overlays of member 1 on the test phantoms with a planted lesion, "
        "with the predicted probability and the truth in each caption",
    ),
    (
        "explain",
        "explain/localisation.md",
        "the pointing game on the planted lesions: how often the heat-map peak "
        "falls inside the box synth drew, against chance (box area / image)",
    ),
    ("explain", "explain/localisation.csv", "the same scores per label as a table"),
    ("gate", "runs/ood/ood_threshold.json", "the gate's threshold: a percentile of the real val images' scores"),
    ("export", "package/manifest.json", "the exported ONNX package (ensemble as one graph + gate), with sha256s"),
    ("export", "site/index.html", "the static browser page (open it through a local server, see README)"),
    ("ood", "ood/verdicts.md", "the exported gate's verdicts: real X-rays accepted, non-X-rays rejected (counts)"),
    ("ood", "ood/verdicts.csv", "every image's gate score and verdict"),
    (
        "ood",
        "ood/images",
        "the images judged: held-out real X-rays, textures, digits, inverted and rotated X-rays, "
        "plots, screenshots, documents, photos, CT slices, limb radiographs, noise, checkerboards, "
        "colour blobs",
    ),
    (
        "predict",
        "predict/predictions.csv",
        "cxr-predict's table: calibrated probabilities, decisions at the tuned "
        "operating points, the gate's verdict per DICOM study",
    ),
    ("predict", "predict/skipped.csv", "the files cxr-predict did not score, with the reason"),
    ("predict", "predict/studies", "the DICOM files (12-bit, MONOCHROME1/2, JPEG-lossless) made from real X-rays"),
    ("web", "web/results.json", "what the page said for each image (top calibrated findings, gate state)"),
]


# ------------------------------------------------------------------ dicoms ---
def cmd_dicoms(args) -> int:
    """Real X-rays as a modality would send them: 12-bit stored values (the 8-bit pixel × 16 plus low bits),
    a window over the whole range, every other one MONOCHROME1, every third JPEG-lossless compressed, one
    without a file name extension — and a structured report, which cxr-predict must list, not score."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, src in enumerate(args.images):
        with Image.open(src) as im:
            pixels = np.asarray(im.convert("L"), dtype=np.uint16)
        mono1 = i % 2 == 1
        stored = ((255 - pixels) if mono1 else pixels) * 16 + rng.integers(0, 16, pixels.shape, dtype=np.uint16)
        data = dicom_bytes(
            stored,
            bits_stored=12,
            photometric="MONOCHROME1" if mono1 else "MONOCHROME2",
            syntax="jpeg-lossless" if i % 3 == 2 else "explicit",
            WindowCenter=2048,
            WindowWidth=4096,
        )
        name = f"study{i:02d}" + ("" if i == 0 else ".dcm")
        (out / name).write_bytes(data)
    (out / "report.dcm").write_bytes(structured_report())
    print(f"dicoms: {len(args.images)} DICOM images (+ 1 structured report) in {out}")
    return 0


TITLES = {
    "phantoms": "Phantom data: synthesize, split by patient, pack, verify",
    "nih": "The real NIH sample: split and pack",
    "ensemble": "Ensemble: two members trained with 2 processes each, evaluated together",
    "external": "External validation: the ensemble on a second site with other label names",
    "sample": "The ensemble on the real NIH sample: calibration, subgroups, operating points",
    "resolution": "Resolution study on fine-detail phantoms",
    "explain": "Explanations: Grad-CAM overlays and the pointing game",
    "gate": "OOD gate: an autoencoder trained on real X-rays, threshold on validation",
    "export": "Export: ONNX package and the browser page",
    "ood": "OOD verdicts on real X-rays vs non-X-rays",
    "predict": "cxr-predict on DICOM files converted from real X-rays",
    "web": "The browser page in headless Chromium, on real X-rays",
}


def _stages(demo: Path) -> list[dict]:
    rows = []
    with open(demo / "stages.tsv", newline="", encoding="utf-8") as fh:
        for name, status, seconds, cpu, reason in csv.reader(fh, delimiter="\t"):
            rows.append({"name": name, "status": status, "seconds": int(seconds), "cpu": int(cpu), "reason": reason})
    return rows


def _headline(demo: Path, name: str) -> str | None:
    """One sentence with the stage's main numbers, read from its tables (None when absent)."""
    try:
        if name == "ensemble":
            a = pd.read_csv(demo / "report" / "aucs.csv")
            mean = {m: g["auroc"].mean() for m, g in a[a["label"].isin(LABELS)].groupby("member")}
            return (
                "Mean test AUROC over the labels: "
                + ", ".join(f"{m} {v:.3f}" for m, v in mean.items())
                + " (phantoms: the signatures are learnable by design)."
            )
        if name == "external":
            t = pd.read_csv(demo / "external" / "report" / "cross_site.csv", keep_default_na=False, na_values=[""])
            kept, gone = t[t["dropped"].isna() & (t["label"] != "mean")], t[t["dropped"].notna()]
            mean = t[t["label"] == "mean"].iloc[0]
            return (
                f"Ensemble on the second site's test images, {len(kept)} shared labels: mean AUROC "
                f"{mean['external_auroc']:.3f} external vs {mean['internal_auroc']:.3f} internal "
                f"(Δ {mean['delta']:+.3f}, paired by label); dropped: "
                + ("; ".join(f"{r.label} ({r.dropped})" for r in gone.itertuples()) or "none")
                + "."
            )
        if name == "resolution":
            t = pd.read_csv(demo / "resolution" / "report" / "ablation.csv", dtype={"variant": str})
            nod = t[(t["label"] == "Nodule") & (t["variant"] != "ensemble of all")]
            top = nod.iloc[-1]
            return (
                "Nodule (the fine-detail label) test AUROC by resolution: "
                + ", ".join(f"{r.variant} px {r.auroc:.3f}" for r in nod.itertuples())
                + f"; Δ at {top['variant']} px vs {top['reference']} px {top['delta']:+.3f}, "
                f"Holm-adjusted DeLong p {top['p_holm']:.3g}."
            )
        if name == "explain":
            pairs = pd.read_csv(demo / "explain" / "localisation_pairs.csv")
            run = json.loads((demo / "explain" / "runs.json").read_text())["runs"][0]
            empty = int(pairs["empty"].sum()) if "empty" in pairs else 0
            return (
                f"Pointing game over {len(pairs)} (image, lesion) pairs, Grad-CAM on {run.get('layer')} "
                f"({run.get('map')} map): the peak is inside the box in {pairs['hit'].mean():.1%} of them; "
                f"a random peak would be in {pairs['chance'].mean():.1%}; {empty} map(s) were empty "
                "(zero everywhere: no evidence for the label, counted as misses)."
            )
        if name == "predict":
            got, skipped = (
                pd.read_csv(demo / "predict" / "predictions.csv"),
                pd.read_csv(demo / "predict" / "skipped.csv"),
            )
            return (
                f"{len(got)} DICOM studies scored by the exported package ({(got['gate'] == 'rejected').sum()} "
                f"rejected by the gate, so no diagnosis; label columns: "
                f"{', '.join(sorted(got['probabilities'].astype(str).unique()))} "
                f"probabilities); {len(skipped)} file(s) listed as skipped: "
                + "; ".join(f"{Path(f).name} ({r})" for f, r in zip(skipped["file"], skipped["reason"]))
                + "."
            )
        if name == "ood":
            c = pd.read_csv(demo / "ood" / "summary.csv")
            return (
                "Accepted / rejected: "
                + "; ".join(f"{r.category} {r.accepted} / {r.rejected}" for r in c.itertuples())
                + "."
            )
    except (OSError, KeyError, IndexError, ValueError):
        return None
    return None


def _link(demo: Path, rel: str, text: str) -> str:
    return f'<li><a href="{html.escape(rel)}">{html.escape(rel)}</a> — {html.escape(text)}</li>'


def cmd_index(args) -> int:
    demo = Path(args.demo)
    stages = _stages(demo)
    parts = [
        "<!doctype html><meta charset=utf-8><title>cxr demo</title>",
        "<style>body{font:15px/1.45 system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em}"
        ".ok{color:#176b2c}.skipped{color:#8a6100}.failed{color:#b00020}.note{background:#fff4d6;"
        "padding:.6em 1em;border-left:4px solid #e0a800}img{max-width:300px;margin:4px;border:1px solid #ccc}"
        "</style>",
        "<h1>cxr — the product tour (<code>make demo</code>)</h1>",
        f'<p class="note">{html.escape(NOT_ACCURACY)}</p>',
    ]
    for st in stages:
        name = st["name"]
        parts.append(
            f'<h2>{html.escape(TITLES.get(name, name))} <span class="{st["status"]}">'
            f"[{st['status']}, {st['seconds']} s, {st['cpu']} CPU s]</span></h2>"
        )
        if st["status"] != "ok":
            parts.append(
                f'<p class="{st["status"]}">{html.escape(st["status"].capitalize())}: {html.escape(st["reason"])}</p>'
            )
        headline = _headline(demo, name) if st["status"] == "ok" else None
        if headline:
            parts.append(f"<p>{html.escape(headline)}</p>")
        items = [_link(demo, rel, text) for stage, rel, text in OUTPUTS if stage == name and (demo / rel).exists()]
        if name == "web" and (demo / "web" / "results.json").is_file():
            for r in json.loads((demo / "web" / "results.json").read_text())["results"]:
                said = ", ".join(f"{t['label']} {t['calibrated']:.2f}" for t in r["top"]) or "no finding shown"
                items.append(_link(demo, f"web/{r['screenshot']}", f"the page on {r['image']}: {r['state']} ({said})"))
        if items:
            parts.append("<ul>" + "".join(items) + "</ul>")
        shots = (
            [f"web/{r['screenshot']}" for r in json.loads((demo / "web" / "results.json").read_text())["results"]]
            if name == "web" and (demo / "web" / "results.json").is_file()
            else []
        )
        if name == "resolution" and (demo / "resolution/report/auroc_vs_resolution.png").is_file():
            shots = ["resolution/report/auroc_vs_resolution.png"]
        parts += [f'<a href="{s}"><img src="{s}" alt="{s}"></a>' for s in shots]
    total = sum(s["seconds"] for s in stages) if args.total_s is None else args.total_s
    cpu = sum(s["cpu"] for s in stages)
    counts = {k: sum(s["status"] == k for s in stages) for k in ("ok", "skipped", "failed")}
    parts.append(
        f"<p>{counts['ok']} stages ok, {counts['skipped']} skipped, {counts['failed']} failed; "
        f"{total} s in all ({cpu} CPU s of user + sys).</p>"
    )
    _write_text(demo / "index.html", "\n".join(parts) + "\n")
    print(
        f"index: {demo}/index.html ({len(stages)} stages: {counts['ok']} ok, {counts['skipped']} skipped, "
        f"{counts['failed']} failed)"
    )
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="scripts/demo_tour.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("outliers", help="held-out real X-rays + non-X-rays into one folder (images.csv)")
    o.add_argument("--splits", required=True, help="the real images' splits table (its test split is used)")
    o.add_argument("--images", required=True, help="folder of the real PNGs")
    o.add_argument("--out", required=True)
    o.add_argument("--n", type=int, default=20, help="images per category (at most the test split's size)")
    o.add_argument("--resolution", type=int, default=256, help="side of the made non-X-rays")
    v = sub.add_parser("verdicts", help="score images.csv's images with the package's ood.onnx")
    v.add_argument("--package", required=True)
    v.add_argument("--images", required=True)
    v.add_argument("--out", required=True)
    w = sub.add_parser(
        "web",
        help="open images through an exported page (cxr.tools.export --web) in headless Chromium: a screenshot "
        "each, what the page said in OUT/results.json",
    )
    w.add_argument(
        "--site", required=True, help="the page's folder (cxr.tools.export --web SITE); images are copied in"
    )
    w.add_argument("--images", nargs="+", required=True, help="PNG/JPEG files to open through the page")
    w.add_argument("--out", required=True, help="folder for the screenshots and results.json")
    w.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    w.add_argument("--playwright", default=str(ROOT / "build" / "npm" / "node_modules" / "playwright-core"))
    w.add_argument("--timeout", type=float, default=180, help="seconds one image may take in Chromium")
    w.add_argument("--demo-note", action="store_true", help="results.json says the models are the demo's toys")
    d = sub.add_parser("dicoms", help="real X-ray PNGs → DICOM files as a modality writes them (+ a report)")
    d.add_argument("--images", nargs="+", required=True)
    d.add_argument("--out", required=True)
    st = sub.add_parser("site", help="a second phantom site's label CSV: its own names, then mapped (labels.csv)")
    st.add_argument("--entry", required=True, help="the site's phantoms' Data_Entry_2017.csv (shards synth)")
    st.add_argument("--out", required=True)
    i = sub.add_parser("index", help="write DEMO/index.html from DEMO/stages.tsv")
    i.add_argument("--demo", required=True)
    i.add_argument("--total-s", type=int, default=None)
    args = p.parse_args(argv)
    return {
        "outliers": cmd_outliers,
        "verdicts": cmd_verdicts,
        "web": cmd_web,
        "dicoms": cmd_dicoms,
        "site": cmd_site,
        "index": cmd_index,
    }[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
