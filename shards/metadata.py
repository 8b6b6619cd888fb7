"""Reading NIH ChestX-ray14 metadata: the Data_Entry CSV, split lists, image inventories.

`read_metadata` turns `Data_Entry_2017[_v2020].csv[.gz]` into one validated row per
image; everything downstream (splits, stats, pack) trusts that table. A generic
labelled CSV (`image,label1[,label2...]`, optional `patient` column) is read by
`read_labelled_csv` into the same table, with its own label names.
"""

from __future__ import annotations

import gzip
import tarfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from cxrbase.errors import CxrError
from cxrbase.labels import LABELS, parse_findings
from cxrbase.progress import progress
from shards.records import nih_name_patient

SEX_COLUMNS = ("Patient Gender", "Patient Sex")  # 2017 / newer copies
_REQUIRED = ("Image Index", "Finding Labels", "Patient ID", "Patient Age", "View Position")
_FIX_CSV = "pass the NIH Data_Entry_2017[_v2020].csv[.gz] file"


def _line(index: int) -> int:
    """Row index of the DataFrame → line number in the file (header is line 1)."""
    return int(index) + 2


def _load_raw(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise CxrError(f"{path}: metadata file not found — {_FIX_CSV}")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise CxrError(f"{path}: empty file (no header, no rows) — {_FIX_CSV}") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError) as err:
        raise CxrError(f"{path}: not a readable CSV ({err}) — {_FIX_CSV}") from err
    missing = [c for c in _REQUIRED if c not in raw.columns]
    if not any(c in raw.columns for c in SEX_COLUMNS):
        missing.append(" or ".join(SEX_COLUMNS))
    if missing:
        raise CxrError(f"{path}: missing column(s) {missing}; found {list(raw.columns)} — {_FIX_CSV}")
    return raw


def _first_bad(path: Path, raw: pd.DataFrame, bad: np.ndarray, column: str, expected: str) -> None:
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise CxrError(
            f"{path}: line {_line(i)} ({raw['Image Index'].iloc[i]}): {column} "
            f"'{raw[column].iloc[i]}' is not {expected} ({int(bad.sum())} such row(s)) — fix the CSV"
        )


def _parse_labels(path: Path, raw: pd.DataFrame) -> np.ndarray:
    """Finding Labels column → uint8 [N, 14]; an unknown/ill-formed name is an error."""
    out = np.zeros((len(raw), len(LABELS)), dtype=np.uint8)
    for i, text in enumerate(raw["Finding Labels"].tolist()):
        try:
            out[i] = parse_findings(text)
        except ValueError as err:
            image = raw["Image Index"].iloc[i]
            raise CxrError(
                f"{path}: line {_line(i)} ({image}): {err} — fix the label names (exact spelling of SPEC.md)"
            ) from err
    return out


def _parse_columns(path: Path, raw: pd.DataFrame) -> pd.DataFrame:
    image = raw["Image Index"].str.strip()
    _first_bad(path, raw, ~image.str.fullmatch(r"[^/\\]+\.png").to_numpy(), "Image Index", "a PNG file name")
    patient = pd.to_numeric(raw["Patient ID"].str.strip(), errors="coerce")
    _first_bad(
        path,
        raw,
        (patient.isna() | (patient < 0) | (patient % 1 != 0)).to_numpy(),
        "Patient ID",
        "a non-negative integer",
    )
    # The first 2017 release wrote ages as '058Y'; later copies write plain years.
    age = pd.to_numeric(raw["Patient Age"].str.strip().str.removesuffix("Y"), errors="coerce")
    _first_bad(path, raw, (age.isna() | (age < 0) | (age % 1 != 0)).to_numpy(), "Patient Age", "whole years")
    sex_col = next(c for c in SEX_COLUMNS if c in raw.columns)
    sex = raw[sex_col].str.strip().str.upper()
    _first_bad(path, raw, ~sex.isin(["M", "F"]).to_numpy(), sex_col, "M or F")
    view = raw["View Position"].str.strip().str.upper()
    _first_bad(path, raw, ~view.isin(["PA", "AP"]).to_numpy(), "View Position", "PA or AP")
    return pd.DataFrame(
        {"image": image, "patient": patient.astype(np.int64), "age": age.astype(np.int64), "sex": sex, "view": view}
    )


def read_metadata(path: str | Path) -> pd.DataFrame:
    """Read and validate the NIH metadata CSV (plain or .gz; 2017 or v2020 header).

    Returns one row per image, file order: image (str, `NNNNNNNN_NNN.png`),
    patient (int64), age (int64 years), sex ('M'|'F'), view ('PA'|'AP'), then the
    14 label columns of cxrbase.labels.LABELS (uint8 0/1). "No Finding" is all zeros.
    Raises CxrError naming the line and image for any unknown label, bad field or
    duplicate image id.
    """
    path = Path(path)
    if _is_labelled_csv(path):
        return read_labelled_csv(path)
    raw = _load_raw(path)
    table = _parse_columns(path, raw)
    labels = pd.DataFrame(_parse_labels(path, raw), columns=list(LABELS))
    table = pd.concat([table, labels], axis=1)
    dup = table["image"].duplicated(keep=False).to_numpy()
    if dup.any():
        rows = np.flatnonzero(dup)
        first = table["image"].iloc[rows[0]]
        lines = [_line(int(i)) for i in rows if table["image"].iloc[i] == first]
        raise CxrError(
            f"{path}: image {first} appears on lines {lines} ({int(dup.sum())} rows "
            "share an id) — keep one row per image"
        )
    # NIH names are PATIENT_FOLLOWUP.png and NIH guarantees PATIENT == Patient ID; a row that
    # disagrees (an edited CSV) would put one patient's images into two splits. Names of
    # another scheme are not checked.
    implied = nih_name_patient(table["image"].str.removesuffix(".png"))
    _first_bad(
        path,
        raw,
        (implied.notna() & (implied != table["patient"])).to_numpy(),
        "Patient ID",
        "the patient of its NIH image name (the name's first 8 digits)",
    )
    return table


def _is_labelled_csv(path: Path) -> bool:
    """True for a generic labelled CSV: its header has `image` and no NIH `Image Index`."""
    if not path.is_file() or path.suffix == ".gz":
        return False
    with open(path, newline="") as fh:
        header = [c.strip() for c in fh.readline().split(",")]
    return "image" in header and "Image Index" not in header


def read_labelled_csv(path: str | Path) -> pd.DataFrame:
    """Read a generic labelled CSV: `image,label1[,label2...]` (+ optional `patient`).

    Every column but `image` and `patient` is a label named by its header: 1, 0, -1 (uncertain:
    pack's --uncertain policy decides) or an empty cell (unknown: masked, skipped by losses and
    metrics — e.g. a label this data set does not have).
    Without `patient` every image is its own patient (a patient-level split is then
    an image-level one). Returns the columns of `read_metadata`: image, patient,
    age/sex/view unknown (None), then the labels (uint8 when fully known, else float: NaN unknown).
    """
    path = Path(path)
    fix = (
        "write `image,label1[,label2...]` with labels 1, 0, -1 (uncertain) or empty (unknown) "
        "(optional integer `patient` column)"
    )
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as err:
        raise CxrError(f"{path}: not a readable CSV ({err}) — {fix}") from err
    raw.columns = [c.strip() for c in raw.columns]
    names = [c for c in raw.columns if c not in ("image", "patient")]
    if not names:
        raise CxrError(f"{path}: no label column besides image/patient — {fix}")
    reserved = [c for c in names if c in ("split", "age", "sex", "view")]
    if reserved:
        raise CxrError(f"{path}: column(s) {reserved} are table fields, not labels — rename or drop them")
    image = raw["image"].str.strip()
    # a PNG or DICOM file name; DICOM exports are often extensionless (UIDs with dots), so any plain name
    _first_bad(
        path,
        raw.rename(columns={"image": "Image Index"}),
        ~image.str.fullmatch(r"[^/\\]+").to_numpy(),
        "Image Index",
        "a file name without folders (name.png, name.dcm or a DICOM's own name)",
    )
    if "patient" in raw.columns:
        patient = pd.to_numeric(raw["patient"].str.strip(), errors="coerce")
        bad = (patient.isna() | (patient < 0) | (patient % 1 != 0)).to_numpy()
        _first_bad(path, raw.rename(columns={"image": "Image Index"}), bad, "patient", "a non-negative integer")
    else:
        patient = pd.Series(np.arange(len(raw)))
    table = pd.DataFrame(
        {
            "image": image,
            "patient": patient.astype(np.int64),
            "age": pd.Series([None] * len(raw), dtype=object),
            "sex": pd.Series([None] * len(raw), dtype=object),
            "view": pd.Series([None] * len(raw), dtype=object),
        }
    )
    for name in names:
        value = raw[name].str.strip()
        _first_bad(
            path,
            raw.rename(columns={"image": "Image Index"}),
            ~value.isin(["0", "1", "-1", ""]).to_numpy(),
            name,
            "1, 0, -1 (uncertain) or empty (unknown)",
        )
        # a fully known column stays uint8; one with unknown/uncertain cells is float (NaN = unknown)
        known = value.isin(["0", "1"]).all()
        table[name] = value.astype(np.uint8) if known else pd.to_numeric(value.replace("", np.nan)).astype(np.float64)
    dup = table["image"].duplicated().to_numpy()
    if dup.any():
        raise CxrError(
            f"{path}: image {table['image'].iloc[int(np.argmax(dup))]} appears twice — keep one row per image"
        )
    return table


def read_image_list(path: str | Path) -> list[str]:
    """Read an NIH list file (`train_val_list.txt[.gz]`): one image name per line, blanks skipped."""
    path = Path(path)
    if not path.is_file():
        raise CxrError(f"{path}: list file not found — pass --train-val-list / --test-list")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as fh:
            names = [line.strip() for line in fh if line.strip()]
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise CxrError(f"{path}: unreadable list file ({err}) — pass a text file, one name per line") from err
    dup = pd.Series(names).duplicated()
    if dup.any():
        raise CxrError(
            f"{path}: {int(dup.sum())} duplicate name(s), first {names[int(np.argmax(dup))]} — list each image once"
        )
    return names


def _is_archive(path: Path) -> bool:
    return path.name.endswith((".tar.gz", ".tgz", ".tar"))


def _archive_members(path: Path) -> list[str]:
    """PNG member base names of a tar(.gz), streamed (no extraction, no seeking)."""
    names = []
    try:
        with (
            tarfile.open(path, mode="r|*") as tar,
            progress(desc=f"listing {path.name}", unit=" files", leave=False) as bar,
        ):
            for member in tar:
                if member.isfile() and member.name.endswith(".png"):
                    names.append(Path(member.name).name)
                    bar.update()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise CxrError(f"{path}: unreadable archive ({err}) — re-download it or extract it") from err
    return names


def read_image_inventory(paths: Iterable[str | Path]) -> set[str]:
    """Image file names available in folders of PNGs, list files and/or NIH archives.

    A folder is searched recursively for *.png; `*.tar.gz`/`*.tgz`/`*.tar` archives
    are listed member by member; any other file is a list, one name per line
    (a name without extension gets `.png`).
    """
    found: set[str] = set()
    for path in map(Path, paths):
        if path.is_dir():
            found.update(p.name for p in path.rglob("*.png"))
        elif path.is_file() and _is_archive(path):
            found.update(_archive_members(path))
        elif path.is_file():
            found.update(n if n.endswith(".png") else f"{n}.png" for n in read_image_list(path))
        else:
            raise CxrError(f"{path}: not found — pass a folder of PNGs, a list file or NIH archives")
    return found
