"""Explaining one run: the images chosen (this rank's share, the evaluator's loader), the model
opened, and each (image, label) map scored against its boxes or drawn as an overlay."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cxr.tools.explain.boxes import box_mask, localisation, scale_boxes
from cxr.tools.explain.maps import METHOD_NAMES, MIN_MAP, choose_layer, heat_maps, upsample
from cxr.tools.explain.masters import Masters
from cxr.tools.explain.overlays import _caption, overlay
from cxrbase.atomic import atomic_write
from cxrbase.errors import CxrError
from shards import remote

if TYPE_CHECKING:
    from cxr.runs.open import EvalOptions


def select_keys(available: Sequence[str], wanted: Sequence[str], shards: Path, split: str) -> list[str]:
    """The wanted keys (``.png`` suffix allowed), each checked to be in the split."""
    have = set(available)
    keys = [Path(k.strip()).stem for k in wanted if k.strip()]
    missing = [k for k in keys if k not in have]
    if missing:
        raise CxrError(
            f"{shards}/manifest.json: split {split!r} has no image {missing[:3]} — "
            "pass keys of that split (NIH ids like 00000001_000), or another --split"
        )
    return list(dict.fromkeys(keys))


def rank_share(indices: Sequence[int], rank: int, world: int) -> list[int]:
    """This rank's contiguous, disjoint share of the (sorted) indices."""
    ordered = sorted(indices)
    n = len(ordered)
    return ordered[rank * n // world : (rank + 1) * n // world]


def subset_loader(loader_cfg: Any, split: str, keys: Sequence[str], rank: int = 0, world: int = 1) -> Any:
    """The evaluator's loader (same decode, resize, normalisation) over this rank's share of ``keys``.

    The shares of the ranks are disjoint, contiguous in packing order, and cover the keys.
    """
    from cxr.data import build_loader
    from cxr.data.plan import EpochPlan

    loader = build_loader(loader_cfg, split, rank=0, world_size=1, epoch=0, train=False)
    position = {k: i for i, k in enumerate(loader.index.keys)}
    ids = np.asarray(rank_share([position[k] for k in keys], rank, world), dtype=np.int64)
    size = loader_cfg.eval_batch
    batches = [ids[i : i + size] for i in range(0, len(ids), size)]
    loader.plan = EpochPlan(batches, len(batches))
    return loader


@dataclass
class Job:
    """What to explain: method, labels per key, boxes per (key, label) in source pixels, outputs."""

    method: str
    labels: dict[str, list[str]]
    boxes: dict[tuple[str, str], pd.DataFrame]
    out: Path
    overlays: bool
    threshold: float
    box_frame: int | None
    names: tuple[str, ...] = ()  # the model's labels (every run must have them); () = each run's own


def explain_run(
    run_dir: str,
    name: str,
    opts: EvalOptions,
    split: str,
    state: Any,
    job: Job,
    masters: Masters,
    layer: str | None = None,
    min_map: int = MIN_MAP,
) -> tuple[list[dict], list[dict], dict]:
    """Explain this rank's share of ``job`` on ``split`` with one run: (score rows, overlay entries, run
    info); ``layer``/``min_map``: as :func:`choose_layer`."""
    import torch

    from cxr.evaluation.inference import check_compatible, shards_labels
    from cxr.runs.open import on_device, open_member, renormaliser, takes_meta

    member = open_member(run_dir, name, state.device)
    model = member.model
    resolution = check_compatible([member], job.names or member.labels, opts.resolution)
    shard_names = shards_labels(remote.location(opts.shards))  # any data set's: truth is read by label name
    for p in model.parameters():
        p.requires_grad_(False)  # gradients flow to the input and the cam layer only
    loader_cfg = member.loader_config(opts, resolution, on_gpu=state.device.type == "cuda")
    loader = subset_loader(loader_cfg, split, list(job.labels), state.process_index, state.num_processes)
    renorm = renormaliser(member, loader_cfg, state.device)
    layer, map_size, why = choose_layer(model, job.method, resolution, layer, min_map)
    if state.is_main_process:
        where = f"layer {layer} ({map_size[0]}×{map_size[1]} map at {resolution} px; {why})" if layer else why
        print(f"{name}: {METHOD_NAMES[job.method]} on {where}", flush=True)
    rows: list[dict] = []
    entries: list[dict] = []
    from cxrbase.progress import progress

    for batch in progress(
        loader,
        total=len(loader),
        desc=f"explain {name}",
        unit="batch",
        disable=not state.is_main_process,
        dynamic_ncols=True,
    ):
        image, meta = on_device(batch, state.device)
        image, meta = renorm(image), meta if takes_meta(model) else None  # heat_maps feeds the model itself
        with torch.no_grad():
            probs = torch.sigmoid(model(image, meta).double()).cpu().numpy()
        truth = batch["labels"].numpy().round()  # NaN: unknown
        keys = list(batch["key"])
        for label in sorted({lab for k in keys for lab in job.labels[k]}, key=member.labels.index):
            rows_b = [b for b, k in enumerate(keys) if label in job.labels[k]]
            c = member.labels.index(label)
            maps = heat_maps(job.method, model, image[rows_b], [c], None if meta is None else meta[rows_b], layer)
            for m, b in zip(maps, rows_b):
                info = {
                    "run": name,
                    "key": keys[b],
                    "label": label,
                    "prob": float(probs[b, c]),
                    "truth": _truth(truth[b], shard_names, label),
                }
                if job.boxes:
                    rows.append({**info, **_score(job, masters, m, keys[b], label, resolution)})
                if job.overlays:
                    entries.append({**info, "file": _write_overlay(job, masters, m, info, name)})
    return (
        rows,
        entries,
        {
            "run": name,
            "run_dir": str(run_dir),
            "model": member.config.model.name,
            "resolution": resolution,
            "layer": layer,
            "map": f"{map_size[0]}×{map_size[1]}" if map_size else "input",
            "layer_why": why,
        },
    )


def _truth(row: np.ndarray, names: Sequence[str], label: str) -> int | None:
    """One image's ground truth of ``label`` by name in the shards' labels: 1, 0, or None when the
    shards do not have the label or do not know it for this image (masked)."""
    if label not in names or np.isnan(row[list(names).index(label)]):
        return None
    return int(row[list(names).index(label)])


def _source_frame(job: Job, masters: Masters, key: str) -> tuple[int, int]:
    return (job.box_frame, job.box_frame) if job.box_frame else masters.size(key)


def _score(job: Job, masters: Masters, heat: Any, key: str, label: str, resolution: int) -> dict:
    """Localisation scores of one map [1,h,w] against the (key, label) region, at the model's R×R."""
    boxes = scale_boxes(job.boxes[(key, label)], _source_frame(job, masters, key), (resolution, resolution))
    region = box_mask(boxes, (resolution, resolution))
    scores = localisation(upsample(heat[None], (resolution, resolution))[0, 0].cpu().numpy(), region, job.threshold)
    return {**scores, "map_h": int(heat.shape[-2]), "map_w": int(heat.shape[-1])}


def _write_overlay(job: Job, masters: Masters, heat: Any, info: dict, run: str) -> str:
    master = masters.image(info["key"])
    width, height = master.size
    full = upsample(heat[None], (height, width))[0, 0].cpu().numpy()
    boxes = None
    if (info["key"], info["label"]) in job.boxes:
        src = _source_frame(job, masters, info["key"])
        boxes = scale_boxes(job.boxes[(info["key"], info["label"])], src, (width, height))[
            ["x", "y", "w", "h"]
        ].to_numpy()
    caption = _caption(info["key"], info["label"], job.method, info["prob"], info["truth"], run, not full.max() > 0)
    image = overlay(master, full, caption, boxes)
    name = f"{run}/{info['key']}_{info['label']}_{job.method}.png"
    (job.out / run).mkdir(parents=True, exist_ok=True)
    with atomic_write(job.out / name, "wb") as fh:
        image.save(fh, format="PNG")
    return name
