"""`python -m shards {split,stats,pack,verify,synth}` — the CPU-side data tool.

Each subcommand's implementation lives in its own module and is imported only
when that subcommand runs (packing on a login node never imports torch).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from cxrbase.errors import CxrError, cli_entry

_HERE = Path(__file__).resolve().parent

# subcommand → module whose `run(args) -> int` implements it
_COMMANDS = {
    "split": "shards.splits",
    "stats": "shards.stats",
    "pack": "shards.pack",
    "verify": "shards.verify",
    "synth": "shards.synth",
}


def _add_split(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "split",
        help="metadata → patient-level train/val/test splits table (NIH, CheXpert, MIMIC, PadChest, VinDr)",
        description="Read a data set's metadata and write a splits table (parquet, or csv by "
        "extension): one row per image with patient, split, the 14 NIH labels, age, sex, view. "
        "No patient is ever in two splits. NIH: --metadata CSV (2017 or v2020 header), labels 0/1. "
        "Other data sets: --dataset NAME --root FOLDER reads the download's own files; their "
        "findings are mapped onto the NIH labels by the shipped harmonisation table (labels a data "
        "set lacks are unknown, left blank; -1 = uncertain), a 'dataset' column is added, and "
        "images are named by their path under ROOT (docs/datasets.md).",
    )
    p.add_argument(
        "--dataset",
        choices=["nih", "chexpert", "mimic", "padchest", "vindr"],
        default="nih",
        help="which data set's layout to read (default nih)",
    )
    p.add_argument("--root", help="other data sets: the folder of the download (docs/datasets.md says which)")
    p.add_argument("--metadata", help="NIH: Data_Entry_2017[_v2020].csv[.gz]")
    p.add_argument(
        "--scheme",
        choices=["official", "stratified", "random"],
        default=None,
        help="official: the published split (NIH lists; CheXpert train/valid; MIMIC -split.csv; VinDr "
        "train/test), val carved out of train by patient where none is published; stratified: label "
        "prevalence balanced over patients; random: seeded patient split. Required for NIH; other data "
        "sets default to official where published, else stratified",
    )
    p.add_argument("--out", required=True, help="output table, .parquet or .csv")
    p.add_argument(
        "--all-views",
        action="store_true",
        help="other data sets: keep lateral and other non-frontal images (default: frontal only; their "
        "view column is left blank, as the shards' view field knows PA/AP only)",
    )
    p.add_argument(
        "--labeler",
        choices=["chexpert", "negbio"],
        default="chexpert",
        help="mimic: which label file, mimic-cxr-2.0.0-chexpert.csv (default) or -negbio.csv",
    )
    p.add_argument(
        "--patients",
        default=None,
        help="mimic: MIMIC-IV hosp/patients.csv[.gz] for sex and age (MIMIC-CXR-JPG carries neither)",
    )
    p.add_argument(
        "--boxes-out",
        default=None,
        help="vindr: also write annotations_train.csv's boxes here in the BBox_List_2017 layout "
        "(for `python -m cxr.tools.explain --bbox`)",
    )
    p.add_argument("--train-val-list", help="train_val_list.txt[.gz] (official; default: beside --metadata)")
    p.add_argument("--test-list", help="test_list.txt[.gz] (official; default: beside --metadata)")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="official: fraction of train_val patients moved to val (default 0.1)",
    )
    p.add_argument(
        "--fractions",
        default=None,
        help="train,val,test fractions (stratified default 0.9,0.05,0.05; random 0.7,0.1,0.2)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--with-no-finding", action="store_true", help="add a 'No Finding' column (1 when all 14 labels are 0)"
    )
    p.add_argument(
        "--method",
        choices=["greedy", "iterstrat"],
        default="greedy",
        help="stratified only. greedy (default): largest patients first into the split whose "
        "per-label positive IMAGE counts fall furthest below target — near-equal image-level "
        "prevalence (≈0.01 pp mean per-label spread on NIH 90/5/5); iterstrat: iterative "
        "stratification (iterative-stratification package) of any-positive patient labels, which "
        "ignores how many images a patient has (1–184 on NIH) and so stays near a random split "
        "(≈0.46 vs 0.71 pp)",
    )
    p.add_argument(
        "--restrict-to",
        nargs="+",
        default=None,
        metavar="SRC",
        help="keep only images present in these folders of PNGs (searched recursively), list "
        "files (one name per line) or NIH archives images_0NN.tar.gz (e.g. the 130-image "
        "sample); the split stays patient-level",
    )
    _add_split_patients(p)


def _add_split_patients(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--patients-from-dicom",
        nargs="+",
        default=None,
        metavar="DIR",
        help="folders of the table's DICOM images: each image's patient is its header's PatientID, written "
        "only as a salted hash (HMAC-SHA256 with --patient-salt-file), so the split stays patient-level "
        "and no ID reaches the table, the shards or a log; replaces the table's patient column",
    )
    p.add_argument(
        "--patient-salt-file",
        default=None,
        metavar="FILE",
        help="secret salt for --patients-from-dicom (≥ 16 bytes; default: $CXR_PATIENT_SALT); keep it out of "
        "the outputs and reuse it, so a patient gets the same key in every table; never stored by cxr",
    )


def _add_stats(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stats",
        help="prevalence per label per split",
        description="Print positives, images and prevalence (%%) per label per split.",
    )
    p.add_argument("splits", help="splits table written by `split` (.parquet or .csv)")
    p.add_argument("--format", choices=["table", "csv", "markdown"], default="table")


def _add_pack(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pack",
        help="images + splits → WebDataset tar shards with a manifest",
        description="Write DIR/{split}-NNNNNN.tar shards (+ DALI .idx) and DIR/manifest.json. "
        "Atomic writes; re-running resumes, skipping shards already complete.",
    )
    p.add_argument("--splits", required=True, help="splits table from `split`")
    p.add_argument(
        "--images",
        required=True,
        nargs="+",
        help="a folder of PNGs and/or NIH archives images_0NN.tar.gz (streamed, not extracted)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output folder, or a URL (s3://bucket/prefix, gs://…): each shard and index is uploaded as a "
        "whole object, manifest.json last; credentials from the standard chain (AWS_PROFILE, env, instance role)",
    )
    p.add_argument(
        "--codec",
        choices=["png", "jpeg", "j2k", "ljpeg"],
        default="png",
        help="png: original bytes, lossless (default), CPU decode only; ljpeg: lossless JPEG "
        "(members .ljpeg), meant for DALI GPU decode (untested on GPU), fast to pack; j2k: lossless JPEG 2000, "
        "GPU-decodable, slower to pack; jpeg: lossy (--quality). See the codec guide in README.md",
    )
    p.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    p.add_argument(
        "--resize",
        type=int,
        default=None,
        help="write derived N×N shards into OUT/resN/ (for lower-resolution training)",
    )
    p.add_argument("--shard-size-mb", type=float, default=1000.0, help="target shard size (default 1000)")
    p.add_argument("--workers", type=int, default=None, help="encode/read processes (default: CPU count)")
    p.add_argument(
        "--allow-missing",
        action="store_true",
        help="record images listed in the splits but absent in the manifest instead of failing",
    )
    p.add_argument(
        "--allow-rejects",
        action="store_true",
        help="exit 0 even if some images were undecodable (they are recorded in the manifest)",
    )
    p.add_argument(
        "--grey16",
        choices=["reject", "minmax"],
        default=None,
        help="16-bit grey PNGs: reject (default), or minmax: each image's [min, max] mapped linearly "
        "to 0..255 (the default for a PadChest table; docs/datasets.md)",
    )
    p.add_argument(
        "--uncertain",
        choices=["ignore", "zeros", "ones"],
        default="ignore",
        help="what an uncertain label (-1 in the splits table, as CheXpert/MIMIC write it) becomes: "
        "ignore = masked like an unknown (empty) cell, skipped by losses and metrics (default; the "
        "CheXpert paper's U-Ignore), zeros = negative, ones = positive. Recorded in the manifest",
    )


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="re-read shards: checksums, counts, decode, labels",
        description="Exit 0 only if every shard matches the manifest, every image decodes "
        "and every label field matches its json.",
    )
    p.add_argument(
        "dir",
        help="shards folder (with manifest.json), or its URL (s3://…, gs://…, https://…: each object streamed once)",
    )
    p.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    p.add_argument(
        "--against",
        nargs="+",
        default=None,
        metavar="SRC",
        help="also compare every image's pixels with its source PNG in these folders or NIH archives "
        "(the --images of pack; archives are streamed once, not extracted), after the grey policy "
        "(resized with pack's Lanczos for derived shards): exact for png/ljpeg/j2k, mean |diff| <= 2 "
        "grey levels for jpeg",
    )
    p.add_argument(
        "--splits",
        default=None,
        metavar="TABLE",
        help="with --against ROOT: the split table pack read (e.g. from `split --dataset`); its image paths "
        "relative to ROOT name the sources (JPEG, DICOM, 16-bit PNG: compared with the grey pixels pack made)",
    )


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="synthetic phantom chest X-rays with learnable per-label signatures",
        description="Write OUT/images/*.png, OUT/Data_Entry_2017.csv (NIH format) and "
        "OUT/train_val_list.txt / OUT/test_list.txt so `split` and `pack` run unchanged, and "
        "OUT/boxes.csv (BBox_List_2017 layout: where each finding was drawn) for `python -m cxr.tools.explain --bbox`.",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, required=True, help="number of images")
    p.add_argument("--resolution", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--metadata",
        default=None,
        help="real NIH metadata CSV: sample real images' label sets (keeping the NIH "
        "co-occurrence), reweighted so every label has ≥5%% prevalence; without it labels are "
        "independent draws with the same floor",
    )
    p.add_argument(
        "--workers", type=int, default=None, help="processes (default: CPU count); the output bytes do not depend on it"
    )
    p.add_argument(
        "--fine-detail",
        default=None,
        metavar="LABEL",
        help="draw LABEL as tiny bright nodules ~2 px wide at this resolution, which only "
        "survive at high resolution (for resolution studies); default: every label's "
        "usual signature",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxr-shards",
        description="NIH ChestX-ray14 → patient-level splits → WebDataset shards. "
        "Typical flow: split → pack → verify (synth makes phantom data for demos).",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_split, _add_stats, _add_pack, _add_verify, _add_synth):
        add(sub)
    return parser


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _warn_if_shadowed()
    module = importlib.import_module(_COMMANDS[args.command])
    if Path(module.__file__ or "").resolve().parent != _HERE:
        raise CxrError(
            f"{module.__file__}: `{module.__name__}` is not cxr's ({_HERE}) — a folder named "
            "'shards' on the path shadows the package; run from another directory or use `cxr-shards`"
        )
    return module.run(args)


def _warn_if_shadowed() -> None:
    """A folder named ``shards/`` in the working directory (e.g. packed shards) can take the place of
    this package's top-level module under ``python -m shards`` with an editable install. Every
    submodule still loads from here (checked in :func:`main`), so say it once and go on."""
    top = sys.modules.get("shards")
    where = getattr(top, "__file__", None)
    if top is not None and (where is None or Path(where).resolve().parent != _HERE):
        shadow = next(iter(getattr(top, "__path__", [])), where)
        print(
            f"warning: {shadow}: this folder shadows the cxr package 'shards' (from {_HERE}) in `python -m "
            "shards`; it works, but use the `cxr-shards` command or another working directory",
            file=sys.stderr,
            flush=True,
        )
