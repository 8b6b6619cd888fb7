"""VinDr-CXR 1.0.0 (Nguyen et al. 2022): ROOT/{train,test}/IMAGE_ID.dicom and the CSVs of ROOT/annotations/.

``image_labels_train.csv``: ``image_id``, ``rad_id`` and one 0/1 column per finding (``Atelectasis``,
``Nodule/Mass``, ``Pleural effusion``, …, ``No finding``), one row per radiologist: each training image
was read by three radiologists. Merged here by majority: a finding is 1 when at least half of the
image's rows mark it (2 of 3), else 0 — a single reader's call is too noisy for a label, and the
test set's labels (``image_labels_test.csv``, one consensus row per image from five readers) are
used as published. Official split: train → train (val carved by --val-fraction), test → test.
VinDr-CXR publishes no patient identifier, so each image is its own patient. Sex, age and view come
from the DICOM header (PatientSex, PatientAge ``052Y``, ViewPosition) when the file is there.
``--boxes-out FILE`` also writes ``annotations_train.csv``'s boxes in the BBox_List_2017 layout
(Image Index = the shard key, NIH label, x, y, w, h in DICOM pixels) for ``cxr.tools.explain --bbox``;
boxes of findings with no direct NIH label (Nodule/Mass among them) are counted and left out.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrbase.atomic import atomic_write
from shards.datasets.common import Loaded, fail_rows, find_file, label_values, read_csv, stable_ids
from shards.datasets.harmonise import mapping_rows
from shards.records import image_key

FIX = "use the annotations of VinDr-CXR 1.0.0 from PhysioNet, unchanged"
NO_FINDING = "No finding"


def _labels(path: Path, official: str, findings: list[str]) -> pd.DataFrame:
    raw = read_csv(path, ["image_id", *findings], FIX, dtype={"image_id": str, "rad_id": str})
    values = label_values(path, raw, findings, FIX)
    fail_rows(path, raw, (values == -1).any(axis=1) | values.isna().any(axis=1), "label value not 0 or 1", FIX)
    values.insert(0, "image_id", raw["image_id"])
    if "rad_id" in raw.columns:
        merged = values.groupby("image_id", sort=False)[findings].mean()
        merged = (merged >= 0.5).astype(np.float64).reset_index()
    else:
        dup = raw["image_id"].duplicated(keep=False).to_numpy()
        fail_rows(path, raw, dup, "image_id listed twice (and no rad_id column)", FIX, "image_id")
        merged = values
    merged["image"] = f"{official}/" + merged["image_id"] + ".dicom"
    merged["official"] = official
    return merged


def _header(path: Path) -> tuple[float, str | None, str | None]:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientSex", "PatientAge", "ViewPosition"])
    except Exception:  # an unreadable file is pack's to reject, with its reason
        return np.nan, None, None
    age = str(getattr(ds, "PatientAge", "") or "")
    years = float(age[:-1]) if len(age) == 4 and age[:3].isdigit() and age[-1] == "Y" else np.nan
    sex = str(getattr(ds, "PatientSex", "") or "")
    view = str(getattr(ds, "ViewPosition", "") or "")
    return years, sex if sex in ("M", "F") else None, view if view in ("PA", "AP") else None


def load(root: Path, args: Any) -> Loaded:
    where = f"pass --root the VinDr-CXR 1.0.0 folder (with annotations/, train/, test/); {FIX}"
    names = ["annotations/image_labels_{}.csv", "image_labels_{}.csv"]
    train = find_file(root, [n.format("train") for n in names], "VinDr-CXR image labels (train)", where)
    test = find_file(root, [n.format("test") for n in names], "VinDr-CXR image labels (test)", where)
    rows = mapping_rows("vindr")
    findings = [r["source"] for r in rows if r["relation"] in ("same", "renamed", "no_finding")]
    table = pd.concat([_labels(train, "train", findings), _labels(test, "test", findings)], ignore_index=True)
    headers = [_header(root / image) for image in table["image"]]
    missing = sum(not (root / image).is_file() for image in table["image"])
    frame = pd.DataFrame(
        {
            "image": table["image"],
            "patient": stable_ids(table["image_id"].tolist()),
            "age": [h[0] for h in headers],
            "sex": [h[1] for h in headers],
            "view": [h[2] for h in headers],
            "frontal": True,  # VinDr-CXR is posteroanterior chest radiographs only
            "official": table["official"],
        }
    )
    frame = pd.concat([frame, table[findings]], axis=1)
    loaded = Loaded(frame, findings, official=True, read=[str(train), str(test)])
    if missing:
        loaded.notes.append(f"{missing:,} DICOM(s) not under {root}: no sex/age/view read for them (pack names them)")
    boxes_out = getattr(args, "boxes_out", None)
    if boxes_out:
        boxes = find_file(
            root, ["annotations/annotations_train.csv", "annotations_train.csv"], "VinDr-CXR boxes", where
        )
        loaded.notes.append(write_boxes(boxes, Path(boxes_out)))
    return loaded


def write_boxes(path: Path, out: Path) -> str:
    """annotations_train.csv → BBox_List_2017 layout; returns a one-line summary."""
    raw = read_csv(path, ["image_id", "class_name", "x_min", "y_min", "x_max", "y_max"], FIX, dtype={"image_id": str})
    target = {r["source"]: r["target"] for r in mapping_rows("vindr") if r["relation"] in ("same", "renamed")}
    boxed = raw.dropna(subset=["x_min", "y_min", "x_max", "y_max"])
    mapped = boxed[boxed["class_name"].isin(list(target))]
    with atomic_write(out, "w") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]"])
        for r in mapped.itertuples(index=False):
            key = image_key(f"train/{r.image_id}.dicom")
            writer.writerow([key, target[r.class_name], r.x_min, r.y_min, r.x_max - r.x_min, r.y_max - r.y_min])
    return f"boxes: {len(mapped):,} of {len(boxed):,} boxes written to {out} ({len(boxed) - len(mapped):,} of findings without a direct NIH label left out)"
