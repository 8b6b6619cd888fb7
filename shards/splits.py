"""`python -m shards split`: NIH metadata → patient-level train/val/test splits table.

Schemes (SPEC.md "Splits"): `official` (NIH lists, val carved out of train_val by
patient), `stratified` (label prevalence even across splits, patients whole),
`random` (seeded patient split). Every scheme assigns whole patients, and the
table is checked for patient overlap before it is written.

Stratified methods:
- `greedy` (default): patients sorted largest first, each placed in the split where
  it most reduces the squared deviation of per-label positive IMAGE counts (plus
  No Finding and image counts) from target, scaled by 1/fraction so the error is in
  prevalence units. Weighting by image counts is what matters: NIH patients have
  1–184 images, so balancing "patient has label" (what iterative stratification sees)
  leaves image-level prevalence nearly as uneven as a random split.
- `iterstrat`: multi-label iterative stratification (iterative-stratification
  package) over patients with any-positive patient labels; kept for comparison.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cxrbase.atomic import atomic_write
from cxrbase.errors import CxrError
from cxrbase.labels import LABELS, NO_FINDING, TABLE_FIELDS, table_labels
from shards.metadata import read_image_inventory, read_image_list, read_metadata
from shards.records import SPLITS
from shards.stats import format_prevalence, label_spread, prevalence_table

DEFAULT_FRACTIONS = {"stratified": (0.9, 0.05, 0.05), "random": (0.7, 0.1, 0.2)}
TABLE_COLUMNS = (
    "image",
    "patient",
    "split",
    *LABELS,
    "age",
    "sex",
    "view",
)  # an NIH table; a generic one has its own labels


def parse_fractions(text: str | None, default: tuple[float, float, float]) -> np.ndarray:
    """'0.9,0.05,0.05' → array of 3 non-negative train,val,test fractions summing to 1."""
    if text is None:
        return np.asarray(default, dtype=np.float64)
    try:
        values = np.asarray([float(v) for v in text.split(",")], dtype=np.float64)
    except ValueError as err:
        raise CxrError(f"--fractions '{text}': not numbers — write e.g. 0.9,0.05,0.05") from err
    if values.size != 3 or (values < 0).any() or abs(values.sum() - 1) > 1e-6 or values[0] <= 0:
        raise CxrError(
            f"--fractions '{text}': need three train,val,test fractions ≥ 0 summing to 1 "
            "with train > 0 — e.g. 0.9,0.05,0.05"
        )
    return values


def patient_counts(meta: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Per-patient image counts: (patient ids [P], counts [P, 16] = 14 labels, No Finding, images)."""
    # positives only: an unknown (NaN) or uncertain (-1) label is not a positive image
    y = (meta[table_labels(meta.columns)].to_numpy(dtype=np.float64) == 1).astype(np.int64)
    per_image = np.column_stack([y, y.sum(axis=1) == 0, np.ones(len(meta), dtype=np.int64)])
    ids, inverse = np.unique(meta["patient"].to_numpy(), return_inverse=True)
    counts = np.zeros((ids.size, per_image.shape[1]), dtype=np.float64)
    np.add.at(counts, inverse, per_image)
    return ids, counts


def greedy_assign(counts: np.ndarray, fractions: np.ndarray, seed: int = 0) -> np.ndarray:
    """Split index (0 train, 1 val, 2 test) per patient, balancing per-label image counts.

    counts: [P, D] per-patient image counts (labels, No Finding, total images).
    Largest patients first (ties in seeded random order). Targets track the patients
    placed so far (fraction × running total), so every split fills at the same pace
    and the many small patients at the end even out what the large ones left; each
    patient goes where the squared deviation from target, scaled by 1/fraction²
    (count error → prevalence error), grows least.
    """
    with np.errstate(divide="ignore"):
        weight = np.where(fractions > 0, 1.0 / np.maximum(fractions, 1e-12) ** 2, np.inf)
    order = np.lexsort((np.random.default_rng(seed).permutation(len(counts)), -counts[:, -1]))
    deviation = np.zeros((fractions.size, counts.shape[1]))  # placed − target, per split × dimension
    assign = np.empty(len(counts), dtype=np.int8)
    for p in order:  # sequential by nature; a few µs per patient on 3×16 arrays
        v = counts[p]
        deviation -= fractions[:, None] * v
        s = int(np.argmin(((2.0 * deviation + v) * v).sum(axis=1) * weight))
        deviation[s] += v
        assign[p] = s
    return assign


def iterstrat_assign(counts: np.ndarray, fractions: np.ndarray, seed: int = 0) -> np.ndarray:
    """Split index per patient by iterative stratification of any-positive patient labels."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    y = (counts[:, :-1] > 0).astype(np.int64)
    assign = np.zeros(len(counts), dtype=np.int8)
    rest = np.arange(len(counts))
    for s, frac in ((2, fractions[2]), (1, fractions[1] / max(fractions[0] + fractions[1], 1e-12))):
        if frac <= 0:
            continue
        splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=float(frac), random_state=seed)
        keep, take = next(splitter.split(np.zeros((rest.size, 1)), y[rest]))
        assign[rest[take]] = s
        rest = rest[keep]
    return assign


def random_assign(n_patients: int, fractions: np.ndarray, seed: int = 0) -> np.ndarray:
    """Split index per patient: a seeded permutation cut into fraction-sized runs of patients.

    Sizes by largest remainder, so they sum to n_patients and small sets still fill every split.
    """
    exact = fractions * n_patients
    sizes = np.floor(exact).astype(int)
    sizes[np.argsort(-(exact - sizes), kind="stable")[: n_patients - sizes.sum()]] += 1
    cuts = np.cumsum(sizes)[:-1]
    assign = np.empty(n_patients, dtype=np.int8)
    for s, chunk in enumerate(np.split(np.random.default_rng(seed).permutation(n_patients), cuts)):
        assign[chunk] = s
    return assign


def _names_error(where: str, names: list[str], fix: str) -> CxrError:
    return CxrError(f"{where}: {len(names):,} image(s), first {names[:5]} — {fix}")


def official_split(
    meta: pd.DataFrame,
    train_val: list[str],
    test: list[str],
    val_fraction: float,
    seed: int,
    restricted: bool,
    lists: tuple[str, str] = ("train_val list", "test list"),
) -> np.ndarray:
    """Split name per image from the NIH lists; val = seeded `val_fraction` of train_val patients.

    Unless `restricted`, every list name must be in the metadata; always, every
    metadata image must be in exactly one list, and no patient in both lists
    (``lists`` names the two list files in that error).
    """
    images = meta["image"]
    tv, te = set(train_val), set(test)
    both = sorted(tv & te)
    if both:
        raise _names_error("train_val and test lists overlap", both, "fix the lists")
    absent = sorted((tv | te) - set(images))
    if absent and not restricted:
        raise _names_error("list entries not in the metadata", absent, "use the lists of the same release")
    unlisted = images[~images.isin(tv | te)].tolist()
    if unlisted:
        raise _names_error("metadata images in neither list", unlisted, "pass the matching lists")
    is_test = images.isin(te).to_numpy()
    _check_lists_patient_level(meta, is_test, lists)
    tv_patients = np.unique(meta["patient"].to_numpy()[~is_test])
    n_val = int(round(val_fraction * tv_patients.size))
    val_patients = np.random.default_rng(seed).permutation(tv_patients)[:n_val]
    split = np.where(is_test, "test", "train").astype(object)
    split[~is_test & meta["patient"].isin(val_patients).to_numpy()] = "val"
    return split


def _check_lists_patient_level(meta: pd.DataFrame, is_test: np.ndarray, lists: tuple[str, str]) -> None:
    """The official lists themselves must not split a patient: name both lists, the patients, their images."""
    patients = meta["patient"].to_numpy()
    both = np.intersect1d(patients[is_test], patients[~is_test])
    if both.size:
        shown = []
        for p in both[:3]:
            mine = meta["patient"].to_numpy() == p
            shown.append(
                f"patient {p}: {lists[0]} {meta['image'][mine & ~is_test].tolist()[:4]}, "
                f"{lists[1]} {meta['image'][mine & is_test].tolist()[:4]}"
            )
        raise CxrError(
            f"{lists[0]} and {lists[1]}: {both.size:,} patient(s) have images in both lists "
            f"({'; '.join(shown)}) — the lists are not patient-level; use the official NIH lists "
            "of the same release or move each patient's images into one list"
        )


def check_patient_disjoint(table: pd.DataFrame) -> None:
    """Raise CxrError if any patient has images in more than one split."""
    per_patient = table.groupby("patient")["split"].nunique()
    leaked = per_patient.index[per_patient > 1].tolist()
    if leaked:
        raise CxrError(
            f"{len(leaked):,} patient(s) in more than one split, first {leaked[:5]} "
            "— splits must be patient-level; this is a bug, please report it"
        )


def assign_by_patient(
    meta: pd.DataFrame,
    scheme: str,
    fractions: np.ndarray,
    seed: int,
    method: str = "greedy",
    where: str | None = None,
) -> np.ndarray:
    """Split name per image for the patient-level `stratified` / `random` schemes.

    With ``where`` (the file the rows came from, for the message), every split requested with a
    fraction > 0 must get at least one patient, else CxrError; without it (a comparison split that
    is only reported) an empty split is allowed.
    """
    ids, counts = patient_counts(meta)
    if scheme == "random":
        per_patient = random_assign(ids.size, fractions, seed)
    elif method == "greedy":
        per_patient = greedy_assign(counts, fractions, seed)
    elif method == "iterstrat":
        per_patient = iterstrat_assign(counts, fractions, seed)
    else:
        raise CxrError(f"--method '{method}': unknown — use greedy or iterstrat")
    if where is not None:
        for index, (name, frac) in enumerate(zip(SPLITS, fractions)):
            if frac > 0 and not (per_patient == index).any():
                raise CxrError(
                    f"{where}: split '{name}' got no patient ({ids.size:,} patients in all, fractions "
                    f"{','.join(f'{f:g}' for f in fractions)}) — use more data or larger --fractions"
                )
    names = np.asarray(SPLITS, dtype=object)
    return names[per_patient[np.searchsorted(ids, meta["patient"].to_numpy())]]


def build_table(meta: pd.DataFrame, split: np.ndarray, with_no_finding: bool = False) -> pd.DataFrame:
    """Metadata + split names → the splits table (columns TABLE_COLUMNS [+ No Finding])."""
    names = table_labels(meta.columns)
    columns = [*TABLE_FIELDS[:3], *names, *TABLE_FIELDS[3:]]
    table = meta.assign(split=split)[columns].reset_index(drop=True)
    if with_no_finding:
        table[NO_FINDING] = ((table[names] == 1).sum(axis=1) == 0).astype(np.uint8)
    return table


def write_splits(table: pd.DataFrame, path: Path) -> None:
    """Write the splits table atomically, parquet or csv by extension, after the overlap check."""
    check_patient_disjoint(table)
    if path.suffix == ".parquet":
        with atomic_write(path, "wb") as fh:
            table.to_parquet(fh, index=False)
    elif path.suffix == ".csv":
        with atomic_write(path, "w") as fh:
            table.to_csv(fh, index=False, lineterminator="\n")
    else:
        raise CxrError(f"{path}: unknown table format — name it .parquet or .csv")


def _load(args) -> tuple[pd.DataFrame, bool]:
    meta = read_metadata(args.metadata)
    if getattr(args, "patients_from_dicom", None):
        meta = dicom_patients(meta, args.patients_from_dicom, args.patient_salt_file, str(args.metadata))
    elif getattr(args, "patient_salt_file", None):
        raise CxrError("--patient-salt-file: only used with --patients-from-dicom — add it, or drop the salt")
    if not args.restrict_to:
        return meta, False
    available = read_image_inventory(args.restrict_to)
    keep = meta["image"].isin(available)
    if not keep.any():
        raise CxrError(
            f"{args.restrict_to}: none of its {len(available):,} images is in {args.metadata} — check the names"
        )
    extra = len(available - set(meta["image"]))
    print(
        f"restricted to {int(keep.sum()):,} of {len(meta):,} images"
        + (f"; {extra:,} inventory image(s) are not in the metadata and were ignored" if extra else "")
    )
    return meta[keep].reset_index(drop=True), True


def dicom_patients(meta: pd.DataFrame, folders, salt_file: str | None, where: str) -> pd.DataFrame:
    """The table with its ``patient`` column replaced by the salted hash of each image's DICOM PatientID
    (shards.dicom.patient_keys); every image of the table must be a DICOM in ``folders``."""
    from shards.dicom import patient_keys, read_salt
    from shards.records import image_key
    from shards.sources import scan_sources

    salt = read_salt(salt_file)
    sources = scan_sources(folders)
    keys = meta["image"].map(image_key)
    missing = sorted(set(keys) - set(sources.files))
    if missing:
        raise CxrError(
            f"{where}: {len(missing)} image(s) of the table are not in {', '.join(map(str, folders))} "
            f"(first {missing[:3]}) — pass the folders that hold every image, or drop those rows"
        )
    found = patient_keys({k: sources.files[k] for k in keys}, salt)
    out = meta.assign(patient=keys.map(found).astype(np.int64))
    print(
        f"patients from DICOM headers: {len(out):,} images, {out['patient'].nunique():,} patients "
        "(PatientID hashed with the salt; no ID written)"
    )
    return out


def _official_lists(args) -> tuple[tuple[Path, list[str]], tuple[Path, list[str]]]:
    here = Path(args.metadata).parent

    def find(given: str | None, stem: str, flag: str) -> Path:
        if given:
            return Path(given)
        for name in (f"{stem}.txt", f"{stem}.txt.gz"):
            if (here / name).is_file():
                return here / name
        raise CxrError(f"{here}: no {stem}.txt[.gz] beside the metadata — pass {flag}")

    tv = find(args.train_val_list, "train_val_list", "--train-val-list")
    te = find(args.test_list, "test_list", "--test-list")
    return (tv, read_image_list(tv)), (te, read_image_list(te))


def _split_names(args, meta: pd.DataFrame, restricted: bool) -> tuple[np.ndarray, np.ndarray | None]:
    if args.scheme == "official":
        if args.fractions is not None:
            raise CxrError(
                "--fractions applies to stratified/random — official takes its test set from "
                "the lists and val from --val-fraction"
            )
        if not 0 <= args.val_fraction < 1:
            raise CxrError(f"--val-fraction {args.val_fraction}: must be in [0, 1)")
        (tv_path, train_val), (test_path, test) = _official_lists(args)
        return official_split(
            meta, train_val, test, args.val_fraction, args.seed, restricted, lists=(str(tv_path), str(test_path))
        ), None
    fractions = parse_fractions(args.fractions, DEFAULT_FRACTIONS[args.scheme])
    split = assign_by_patient(
        meta, args.scheme, fractions, args.seed, getattr(args, "method", "greedy"), where=str(args.metadata)
    )
    return split, fractions


def _report(table: pd.DataFrame, args, fractions: np.ndarray | None, meta: pd.DataFrame) -> None:
    for name in SPLITS:
        part = table[table["split"] == name]
        if len(part):
            print(
                f"{name:>5}: {len(part):>7,} images {part['patient'].nunique():>7,} patients "
                f"({100 * len(part) / len(table):.1f}% of images)"
            )
    print(format_prevalence(prevalence_table(table), "table"))
    spread = label_spread(table).mean()
    line = f"mean per-label prevalence spread (max−min across splits): {spread:.3f} pp"
    if args.scheme == "stratified" and fractions is not None:
        reference = build_table(meta, assign_by_patient(meta, "random", fractions, args.seed))
        line += (
            f" ({getattr(args, 'method', 'greedy')}) vs {label_spread(reference).mean():.3f} pp for a "
            f"random patient split of the same fractions (seed {args.seed})"
        )
    print(line)


MAX_FRACTION_GAP = 0.05  # image share of a split vs its requested fraction, beyond which split warns


def fraction_warnings(
    table: pd.DataFrame, fractions: np.ndarray | None, where: str, gap: float = MAX_FRACTION_GAP
) -> list[str]:
    """A warning (one line) naming the splits whose share of images is more than ``gap`` off their
    requested fraction.

    Patient-level splits assign whole patients, so a few patients with many images move the
    image shares (NIH: 1–184 images per patient; battery 2, 10.5: one 500-image patient put
    84 % of the images in a 20 % test split). The warning names the largest patients.
    """
    if fractions is None or not len(table):
        return []
    sizes = table.groupby("patient").agg(images=("split", "size"), split=("split", "first"))
    largest = sizes.sort_values("images", ascending=False, kind="stable").head(3)
    who = ", ".join(f"patient {p} has {int(r.images)} images (in {r.split})" for p, r in largest.iterrows())
    off = []
    for name, frac in zip(SPLITS, fractions):
        share = float((table["split"] == name).mean())
        if abs(share - frac) > gap:
            off.append(f"'{name}' holds {100 * share:.1f}% of the images ({100 * frac:.0f}% requested)")
    if not off:
        return []
    return [
        (
            f"{where}: split {', '.join(off)} — the split is by patient and the largest patients dominate "
            f"({who}); check that these patients belong in the data, or leave out or cap the largest"
        )
    ]


def run(args) -> int:
    """CLI: read metadata, assign splits per --scheme, check, report and write the table."""
    if getattr(args, "dataset", "nih") != "nih":
        from shards.datasets.common import run_split  # noqa: PLC0415 — the other data sets' adapters

        return run_split(args)
    if not args.metadata or not args.scheme:
        raise CxrError(
            "split (NIH): pass --metadata Data_Entry_2017.csv and --scheme — or --dataset NAME --root FOLDER"
        )
    start = time.perf_counter()
    out = Path(args.out)
    if out.suffix not in (".parquet", ".csv"):
        raise CxrError(f"{out}: unknown table format — name it .parquet or .csv")
    meta, restricted = _load(args)
    split, fractions = _split_names(args, meta, restricted)
    table = build_table(meta, split, args.with_no_finding)
    check_patient_disjoint(table)
    _report(table, args, fractions, meta)
    for warning in fraction_warnings(table, fractions, str(args.metadata)):
        print(f"warning: {warning}", file=sys.stderr)
    write_splits(table, out)
    counts = " / ".join(f"{s} {int((table['split'] == s).sum()):,}" for s in SPLITS)
    print(
        f"split {args.scheme}: {len(table):,} images, {table['patient'].nunique():,} patients "
        f"({counts}) → {out} in {time.perf_counter() - start:.1f} s"
    )
    return 0
