"""Inference of trained members: score a split with every member, gather across ranks, ensemble.

What ``python -m cxr.evaluate`` and cxr.tools.ablation use to turn training run dirs into scores;
the run dirs are opened by cxr.runs.open (typed config, best weights, model, loader config), the
analysis and the report are cxr.evaluation.report's, the prediction tables cxr.evaluation.predictions'.

Members run in eval mode under ``torch.inference_mode``. The split is read once per
distinct resolution and every member of that resolution scores each batch; under a
launcher each rank infers a disjoint part of the split and rank 0 gathers the scores,
joins the resolution groups by key and checks that every image of the split (per the
shards manifest, read by shards.manifest) was scored exactly once.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxr.evaluation.report import ENSEMBLE, ScoreSet
from cxr.runs.open import (
    EvalOptions,
    Member,
    build_member_model,
    check_distinct,
    feed,
    member_info,
    on_device,
    read_member,
    renormaliser,
)
from cxrbase.errors import CxrError
from shards import remote
from shards.manifest import load_manifest, manifest_path
from shards.records import image_key, read_table

# ---------------------------------------------------------------- members ----


def member_names(run_dirs: Sequence[str | Path]) -> list[str]:
    """Unique, readable member names: the run dir's name, suffixed when two collide."""
    names: list[str] = []
    for run_dir in run_dirs:
        base = Path(run_dir).resolve().name or "run"
        base = f"{base}_member" if base == ENSEMBLE else base
        name, n = base, 2
        while name in names:
            name, n = f"{base}_{n}", n + 1
        names.append(name)
    return names


def member_label_plan(members: Sequence[Member], shards: Path) -> Any:
    """The labels the members (the first one's: check_compatible makes them one set) share with
    the shards by name (cxr.evaluation.cross_site.label_plan); CxrError when none."""
    from cxr.evaluation.cross_site import label_plan

    return label_plan(members[0].labels, shards_labels(shards), f"{remote.location(shards) / 'manifest.json'}")


def check_compatible(members: Sequence[Member], labels: Sequence[str], resolution: int | None) -> int | None:
    """Refuse members whose label set differs from ``labels`` (the first member's: an ensemble
    needs one label set; the shards may hold another set, see cxr.evaluation.cross_site); return the eval
    resolution (None: each member's own).

    ``resolution`` is the user's ``--resolution`` (None: the members' shared training
    resolution, or None when they differ).
    """
    for m in members:
        if list(m.labels) != list(labels):
            raise CxrError(
                f"{m.run_dir}: member {m.name} was trained on {len(m.labels)} labels {m.labels[:3]}… "
                f"but another member on {len(labels)} labels {list(labels)[:3]}… — an ensemble needs one "
                "label set; evaluate runs trained on the same labels together, or leave this one out"
            )
    if resolution is not None:
        return int(resolution)
    first = members[0]
    if first.resolution is None:
        raise CxrError(f"{first.run_dir}/config.yaml: no data.resolution — pass --resolution")
    for m in members[1:]:
        if m.resolution is None:
            raise CxrError(f"{m.run_dir}/config.yaml: no data.resolution — pass --resolution")
        if m.resolution != first.resolution:
            return None  # mixed: each member at its own training resolution (infer_runs)
    return int(first.resolution)


# -------------------------------------------------------------- inference ----


def infer_split(
    members: Sequence[Member], loader_cfg: Any, split: str, state: Any, precision: str = "fp32", plan: Any = None
) -> ScoreSet:
    """Score this rank's share of ``split`` with every member (one read of the data). ``plan``
    (cxr.evaluation.cross_site.LabelPlan): keep only the labels the members and the shards share, each
    side's columns picked by name (default: the members' labels are the shards')."""
    import torch

    from cxr.data import build_loader
    from cxrbase.progress import progress

    device = state.device
    loader = build_loader(
        loader_cfg, split, rank=state.process_index, world_size=state.num_processes, epoch=0, train=False
    )
    renorm = {m.name: renormaliser(m, loader_cfg, device) for m in members}
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    keys: list[str] = []
    truth: list[np.ndarray] = []
    probs: dict[str, list[np.ndarray]] = {m.name: [] for m in members}
    try:
        total = len(loader)
    except TypeError:
        total = None
    bar = progress(
        loader, total=total, desc=f"infer {split}", unit="batch", disable=not state.is_main_process, dynamic_ncols=True
    )
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        for batch in bar:
            image, meta = on_device(batch, device)
            # float64 sigmoid keeps logits up to ~37 distinguishable (mean-logit ensembles); one
            # device→host copy per batch for all members (each copy is a sync point)
            batch_probs = (
                torch.stack([torch.sigmoid(feed(m.model, image, meta, renorm[m.name]).double()) for m in members])
                .cpu()
                .numpy()
            )
            for m, p in zip(members, batch_probs):
                probs[m.name].append(p if plan is None else p[:, plan.model_index])
            keys.extend(str(k) for k in batch["key"])
            y = batch["labels"].cpu().numpy().round()  # NaN (unknown) stays NaN
            truth.append(y if plan is None else y[:, plan.shards_index])
    labels = tuple(members[0].labels) if plan is None else plan.shared
    n_labels = len(labels)
    return ScoreSet(
        keys=np.asarray(keys, dtype=object),
        y_true=truth_array(truth, n_labels),
        scores={k: np.concatenate(v) if v else np.zeros((0, n_labels)) for k, v in probs.items()},
        labels=labels,
    )


def gather_scores(local: ScoreSet, state: Any) -> ScoreSet | None:
    """Collect every rank's scores on rank 0 (others get None), deduplicated and sorted by key."""
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        parts = gather_object([local])
    else:
        parts = [local]
    if not state.is_main_process:
        return None
    merged = ScoreSet(
        keys=np.concatenate([p.keys for p in parts]),
        y_true=np.concatenate([p.y_true for p in parts]),
        scores={name: np.concatenate([p.scores[name] for p in parts]) for name in local.scores},
        labels=local.labels,
    )
    return merged.deduplicated()


def truth_array(batches: Sequence[np.ndarray], n_labels: int) -> np.ndarray:
    """The ground truth [N, L] of a split from the loaders' label batches: uint8 0/1 when every
    label is known (as before masks existed), else float32 with NaN for the unknown entries."""
    y = np.concatenate(batches) if batches else np.zeros((0, n_labels), np.float32)
    return y.astype(np.uint8) if not np.isnan(y).any() else y.astype(np.float32)


def join_members(parts: Sequence[ScoreSet | None], order: Sequence[str], shards: Path, split: str) -> ScoreSet | None:
    """Join per-resolution passes (each sorted by key) into one ScoreSet, members in ``order``."""
    if parts[0] is None:  # not rank 0
        return None
    first = parts[0]
    for part in parts[1:]:
        if not np.array_equal(part.keys, first.keys) or not np.array_equal(
            np.asarray(part.y_true, np.float64), np.asarray(first.y_true, np.float64), equal_nan=True
        ):
            raise CxrError(
                f"{shards}: split {split!r} gave different images or labels at two "
                "resolutions — the derived resN/ shards must hold the masters' samples; "
                "re-run `python -m shards pack --resize`"
            )
    scores = {k: v for part in parts for k, v in part.scores.items()}
    return dataclasses.replace(
        first, scores={name: scores[name] for name in order}, duplicates=max(p.duplicates for p in parts)
    )


def expected_keys(
    shards: Path, split: str, if_empty: str = "use --thresholds-from none"
) -> tuple[int, set[str] | None]:
    """The number of samples of ``split`` in the manifest and, if its splits table is at hand, their keys."""
    manifest = load_manifest(shards)
    splits = manifest["splits"]
    if split not in splits:
        raise CxrError(
            f"{manifest_path(shards)}: no split {split!r} (has {sorted(splits)}) — choose --split "
            "/ --thresholds-from among those"
        )
    count = int(splits[split].get("samples", 0) or 0)
    if count == 0:
        raise CxrError(
            f"{manifest_path(shards)}: split {split!r} has no samples — {if_empty} "
            f"(splits with samples: {sorted(s for s in splits if splits[s].get('samples'))})"
        )
    table = manifest.get("splits_file")
    if table and not Path(table).is_absolute() and remote.is_url(shards):
        return count, None  # a table beside shards at a URL: the count check alone
    table_path = (Path(shards) / table) if table and not Path(table).is_absolute() else Path(table or "")
    if not table or not table_path.is_file():
        return count, None
    try:
        frame = read_table(table_path)  # shards' reader of the splits table
    except CxrError:  # a table that is not the one packed: the count check alone
        return count, None
    keys = {image_key(str(i)) for i in frame.loc[frame["split"] == split, "image"]}
    dropped = set(manifest["missing"]) | {r.get("image") for r in manifest["rejected"]}
    return count, {Path(str(k)).stem for k in keys - dropped}


def check_coverage(scores: ScoreSet, shards: Path, split: str) -> None:
    """Every image of the split scored exactly once: else raise naming what is missing/extra."""
    count, keys = expected_keys(shards, split)
    got = set(scores.keys.tolist())
    if keys is not None and got != keys:
        missing, extra = sorted(keys - got), sorted(got - keys)
        raise CxrError(
            f"{shards}/manifest.json: split {split!r} has {len(keys)} images but "
            f"{len(got)} were scored (missing {missing[:3]}, unexpected {extra[:3]}) — "
            "the loader must deliver each sample once across ranks; re-pack or --debug"
        )
    if len(got) != count:
        raise CxrError(
            f"{shards}/manifest.json: split {split!r} has {count} samples but {len(got)} "
            "distinct images were scored — the loader must deliver each sample once "
            "across ranks; check the shards with `python -m shards verify`"
        )


# ---------------------------------------------------------------- ensemble ---


def ensemble_scores(scores: dict[str, np.ndarray], method: str = "mean-prob") -> np.ndarray:
    """The ensemble's probabilities [N, L]: mean of member probabilities, or sigmoid of mean logits."""
    stack = np.stack([np.asarray(s, dtype=np.float64) for s in scores.values()])
    if method == "mean-prob":
        return stack.mean(axis=0)
    if method == "mean-logit":
        from scipy.special import expit, logit

        # Clip so a saturated member (p == 0 or 1 in float64) stays finite.
        eps = 1e-15
        return expit(logit(np.clip(stack, eps, 1 - eps)).mean(axis=0))
    raise CxrError(f"--ensemble {method}: unknown method — use mean-prob or mean-logit")


def with_ensemble(scores: ScoreSet, method: str) -> ScoreSet:
    """A copy of ``scores`` with the ensemble (of all its members) added last."""
    members = {k: v for k, v in scores.scores.items() if k != ENSEMBLE}
    if not members:
        return scores
    return dataclasses.replace(scores, scores={**members, ENSEMBLE: ensemble_scores(members, method)})


# ------------------------------------------------------------------ runs ---


def shards_labels(shards: Path) -> list[str]:
    """The label names of a shards folder (its manifest's ``labels``)."""
    return list(load_manifest(shards)["labels"])


def process_state(cpu: bool = False) -> Any:
    """The launcher's process layout (1 process when started without a launcher); ``cpu``: even with a GPU."""
    import torch
    from accelerate import PartialState

    from cxr.runs.distributed import import_before_process_group

    import_before_process_group()
    return PartialState(cpu=cpu or not torch.cuda.is_available())


def infer_runs(
    runs: Sequence[str | Path], opts: EvalOptions, state: Any, splits: Sequence[str], on_ready: Any = None
) -> tuple[dict[str, ScoreSet] | None, list[dict[str, Any]]]:
    """Open every member, infer each split once across ranks; rank 0 gets {split: ScoreSet}.

    ``splits[0]`` is the split evaluated (the others: where thresholds are chosen). ``on_ready(members)``,
    if given, is called once every member's model is loaded, before inference."""
    shards = remote.location(opts.shards)
    check_distinct(runs)
    members = [read_member(r, n) for r, n in zip(runs, member_names(runs))]
    plan = member_label_plan(members, shards)
    resolution = check_compatible(members, members[0].labels, opts.resolution)
    for m in members:  # opened (cxr.runs.open.open_member) once all agree on labels and resolution
        m.model = build_member_model(m, state.device)
    groups: dict[int, list[Member]] = {}  # one pass over the split per distinct resolution
    for m in members:
        groups.setdefault(int(resolution or m.resolution), []).append(m)
    on_gpu = state.device.type == "cuda"
    loader_cfgs = {res: group[0].loader_config(opts, res, on_gpu) for res, group in groups.items()}
    per_split: dict[str, ScoreSet] = {}
    for split in splits:  # fail before any inference if a split does not exist or is empty
        expected_keys(shards, split, "choose another --split" if split == splits[0] else "use --thresholds-from none")
    if on_ready is not None:
        on_ready(members)
    for split in splits:
        parts = [
            gather_scores(infer_split(group, loader_cfgs[res], split, state, opts.precision, plan), state)
            for res, group in groups.items()
        ]
        merged = join_members(parts, [m.name for m in members], shards, split)
        if merged is not None:
            if merged.duplicates:
                print(
                    f"note: split {split!r}: {merged.duplicates} duplicated keys across ranks dropped", file=sys.stderr
                )
            check_coverage(merged, shards, split)
            per_split[split] = merged
    infos = [member_info(m, resolution or m.resolution) for m in members]
    return (per_split if state.is_main_process else None), infos
