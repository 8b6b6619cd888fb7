"""Atomic save and exact restore of a run's ``last`` / ``best`` checkpoints (docs/run-dir.md).

A checkpoint is a folder ``RUN/checkpoints/{name}/``:

- ``model.safetensors`` — the unwrapped model's weights (DeepSpeed: consolidated), what the
  evaluator loads; no pickled code.
- ``state.pt``          — optimizer, scheduler, scaler, loop progress, early-stopping state,
  metrics rows so far and one entry per rank (RNG states, running loss) — loaded with
  ``torch.load(weights_only=True)``.
- ``meta.json``         — human-readable summary (epoch, steps, config hash, val metrics).
- ``deepspeed/``        — DeepSpeed's own sharded save (optimizer partitions of every rank).

Writing is collective (every rank calls :func:`save_checkpoint`): the RNG states and
running sums of all ranks are gathered to rank 0, DeepSpeed ranks write their shards,
then rank 0 writes the rest into ``{name}.tmp`` and swaps it in by renames
(``name`` → ``name.old``, ``name.tmp`` → ``name``, delete ``name.old``). A crash at
any point leaves either the old or the new checkpoint complete under ``name`` or,
between the two renames, under ``name.old`` — which :func:`find_checkpoint` falls back to.

This module is the one owner of the checkpoint folders: finding them (:func:`find_checkpoint`,
:func:`best_weights`), reading their meta and weights (:func:`read_meta`, :func:`read_weights`,
:func:`load_weights`) and writing them.
All ranks must see the run dir (a shared filesystem on multi-node jobs).
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather_object  # gather_object([x]): [x of rank 0, x of rank 1, ...]
from safetensors.torch import load_file, save_file

from cxr.models.transformer import fit_position_embeddings
from cxr.models.weights import load_error_line  # one owner of the "why a load failed" line (also for weights files)
from cxr.runs.distributed import unwrap_model
from cxrbase.errors import CxrError

WEIGHTS, STATE, META, DEEPSPEED_DIR, DEEPSPEED_TAG = "model.safetensors", "state.pt", "meta.json", "deepspeed", "state"


# ---------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """This process's python, numpy, torch (and CUDA) RNG states, as weights_only-loadable types."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np.array(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore the states saved by :func:`rng_state` in this process."""
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# ---------------------------------------------------------------------------- collectives
def _barrier(accelerator) -> None:
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------- find / read
def find_checkpoint(run_dir: str | Path, name: str = "last") -> Path | None:
    """The complete checkpoint folder ``name`` of a run, or None (falls back to ``name.old``
    left by a crash between the two renames of a save)."""
    root = Path(run_dir) / "checkpoints"
    for candidate in (root / name, root / f"{name}.old"):
        if (candidate / META).is_file():
            return candidate
    return None


def best_weights(run_dir: str | Path) -> Path:
    """``model.safetensors`` of a run's ``best`` checkpoint (what the evaluator loads); a CxrError
    naming the file and the fix when the run has none."""
    found = find_checkpoint(run_dir, "best")
    if found is None or not (found / WEIGHTS).is_file():
        best = Path(run_dir) / "checkpoints" / "best"
        raise CxrError(
            f"{(found or best) / WEIGHTS}: run {run_dir} has no best checkpoint — "
            "train it to completion (or copy checkpoints/last to checkpoints/best)"
        )
    return found / WEIGHTS


def read_meta(ckpt: str | Path) -> dict:
    """meta.json of a checkpoint folder."""
    path = Path(ckpt) / META
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CxrError(f"{path}: unreadable checkpoint metadata ({err}) — delete the folder or pick another") from None


# ---------------------------------------------------------------------------- save
def save_checkpoint(
    accelerator,
    run_dir: str | Path,
    name: str,
    *,
    model,
    meta: dict,
    optimizer=None,
    scheduler=None,
    state: dict | None = None,
    per_rank: dict | None = None,
) -> Path:
    """Write checkpoint ``name`` atomically; every rank must call it (it gathers and, under
    DeepSpeed, writes sharded optimizer states). ``state=None`` writes weights + meta only
    (``best``). ``per_rank``: this rank's entries (e.g. running loss); RNG states are added."""
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / name, root / f"{name}.tmp"
    full = state is not None
    ranks = gather_object([{"rng": rng_state(), **(per_rank or {})}]) if full else None
    if _is_deepspeed(accelerator):
        weights = accelerator.get_state_dict(model)  # collective under ZeRO-3; unwrapped names
    else:  # the same state dict, without accelerate's import of deepspeed (cxr.runs.distributed.unwrap_model)
        weights = unwrap_model(accelerator, model).state_dict()
    failure = None
    if accelerator.is_main_process:
        _recover(root, name)
        shutil.rmtree(tmp, ignore_errors=True)
        failure = _guard_write(tmp, lambda: tmp.mkdir(parents=True))
    _raise_if_any(failure, tmp)
    if full and _is_deepspeed(accelerator):
        model.save_checkpoint(str(tmp / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, save_latest=False)
        _barrier(accelerator)
    if accelerator.is_main_process:

        def write() -> None:
            _write_weights(tmp / WEIGHTS, weights)
            if full:
                payload = {
                    **state,
                    "ranks": ranks,
                    "world_size": accelerator.num_processes,
                    "optimizer": None if _is_deepspeed(accelerator) or optimizer is None else optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                }
                torch.save(payload, tmp / STATE)
            (tmp / META).write_text(json.dumps(meta, indent=2, default=_json_default) + "\n")
            _swap(root, name)

        failure = _guard_write(tmp, write)
        if failure is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # the previous `name` (or name.old) stays the one to resume
    _raise_if_any(failure, tmp)
    return final


_WRITE_ERRORS = {
    errno.ENOSPC: "no space left",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only filesystem",
    errno.EACCES: "permission denied",
}


def _guard_write(tmp: Path, write) -> str | None:
    """Run ``write``; return a one-line error message instead of raising an I/O failure.

    torch.save reports a full disk as ``RuntimeError: [enforce fail at inline_container.cc:...]
    unexpected pos ...`` (its zip writer checks the bytes written): that is a short write."""
    try:
        write()
    except OSError as err:
        what = _WRITE_ERRORS.get(err.errno, err.strerror or str(err))
        return f"{err.filename or tmp}: {what} writing the checkpoint"
    except RuntimeError as err:
        text = str(err)
        if "inline_container" not in text and "unexpected pos" not in text and "write" not in text.lower():
            raise
        return f"{tmp / STATE}: no space left writing the checkpoint (torch.save: {text.splitlines()[0][:80]})"
    return None


def _raise_if_any(failure: str | None, tmp: Path) -> None:
    """Every rank raises when rank 0 could not write (the others would wait at the next collective)."""
    failures = [f for f in gather_object([failure]) if f]
    if failures:
        raise CxrError(
            f"{failures[0]} — free space or fix the permissions of {tmp.parent.parent} (or choose "
            f"another checkpoint.run_dir); the previous checkpoint is intact and the same command resumes"
        )


def _write_weights(path: Path, weights: dict) -> None:
    # clone: safetensors refuses tensors that share storage (tied or viewed parameters)
    # the plain module's names: torch.compile adds an `_orig_mod.` level the evaluator does not have
    tensors = {k.replace("_orig_mod.", ""): v.detach().to("cpu").contiguous().clone() for k, v in weights.items()}
    save_file(tensors, str(path))


def _recover(root: Path, name: str) -> None:
    """Undo a crash between the two renames: ``name.old`` is then the only complete copy."""
    final, old = root / name, root / f"{name}.old"
    if old.exists() and not final.exists():
        os.replace(old, final)
    shutil.rmtree(old, ignore_errors=True)


def _swap(root: Path, name: str) -> None:
    """Make ``name.tmp`` durable, then rename it over ``name`` (files inside the not-yet-visible
    tmp folder need no atomic writes of their own)."""
    final, tmp, old = root / name, root / f"{name}.tmp", root / f"{name}.old"
    for path in tmp.rglob("*"):
        if path.is_file():
            _fsync(path)
    _fsync(tmp)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync(root)
    shutil.rmtree(old, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


# ---------------------------------------------------------------------------- load
# The one reader of a checkpoint's weights (training resume, model.init_from, and through
# cxr.runs.open.open_member the evaluator, explain, embed, export and ood): safetensors
# only, so loading never executes pickled code.
_CORRUPT_FIX = "delete it (or use last.old/best) or start a new run"
_FITS_FIX = "use the model section the run was trained with (RUN/config.yaml), or a new checkpoint.run_dir"


def load_weights(
    model: torch.nn.Module, ckpt: str | Path, *, fix: str = _FITS_FIX, corrupt_fix: str = _CORRUPT_FIX
) -> None:
    """Load ``ckpt/model.safetensors`` into an unwrapped model (strict: every key and shape must match).

    ``fix`` / ``corrupt_fix``: what the error tells the user to do when the weights do not fit
    the model / the file is corrupt."""
    path = Path(ckpt) / WEIGHTS
    saved = fit_position_embeddings(model, read_weights(path, corrupt_fix=corrupt_fix))  # an older ViT's 224 grid
    check_fits(model, saved, path, fix=fix)
    model.load_state_dict(saved, strict=True)


def read_weights(path: Path, *, corrupt_fix: str = _CORRUPT_FIX) -> dict[str, torch.Tensor]:
    """The tensors of a model.safetensors file (on CPU); a missing or corrupt file is a CxrError."""
    if not path.is_file():
        raise CxrError(f"{path}: missing — the checkpoint is incomplete; delete it or pick another")
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError) on a bad file
        raise CxrError(
            f"{path}: corrupt checkpoint weights ({str(err).splitlines()[0][:80]}) — {corrupt_fix}"
        ) from None


def check_fits(model: torch.nn.Module, saved: dict[str, torch.Tensor], path: Path, *, fix: str = _FITS_FIX) -> None:
    """CxrError naming the tensors when ``saved`` does not fit ``model`` (missing, unexpected, other shape)."""
    own = model.state_dict()
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    shapes = [
        f"{k} {list(saved[k].shape)} in the checkpoint vs {list(own[k].shape)} here"
        for k in own
        if k in saved and saved[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = (
            ([f"other shape: {', '.join(shapes[:3])}"] if shapes else [])
            + ([f"missing: {missing[:3]}"] if missing else [])
            + ([f"unexpected: {unexpected[:3]}"] if unexpected else [])
        )
        raise CxrError(f"{path}: the model differs from the checkpoint ({'; '.join(parts)}) — {fix}")


def init_weights_from(model: torch.nn.Module, run_dir: str | Path, model_kwargs: dict) -> dict:
    """Initialise ``model`` with the weights of another run (``model.init_from``): its ``best``
    checkpoint, else its ``last``. Weights only: no optimizer, schedule or progress.

    The architecture (every model key but num_labels, dropout and pretrained) must be the same;
    with another number of labels the head is left as built (freshly initialised) and the rest
    is loaded. Returns {"checkpoint", "loaded", "reinitialised"} for the log and meta.json."""
    run_dir = Path(run_dir)
    found = find_checkpoint(run_dir, "best") or find_checkpoint(run_dir, "last")
    if found is None:
        raise CxrError(
            f"model.init_from={run_dir}: no checkpoints/best or checkpoints/last there — "
            f"give the run dir of a trained run"
        )
    theirs = read_meta(found).get("model", {})
    free = {"num_labels", "dropout", "pretrained", "init_from", "img_size"}  # a ViT grid is resampled below
    differ = sorted(
        k for k in set(theirs) | set(model_kwargs) if k not in free and theirs.get(k) != model_kwargs.get(k)
    )
    if differ:
        mine = {k: model_kwargs.get(k) for k in differ}
        raise CxrError(
            f"model.init_from={run_dir}: {found} holds a model {theirs.get('name')} "
            f"{ {k: theirs.get(k) for k in differ} }, this config builds {model_kwargs.get('name')} "
            f"{mine} — set the model section to the source run's, or drop model.init_from"
        )
    path = found / WEIGHTS
    saved = fit_position_embeddings(model, read_weights(path))
    own = model.state_dict()
    skip = []
    if theirs.get("num_labels", model_kwargs.get("num_labels")) != model_kwargs.get("num_labels"):
        skip = [k for k in own if k in saved and saved[k].shape != own[k].shape]
        if any(not k.startswith("head.") for k in skip):
            raise CxrError(
                f"{path}: tensors outside the head differ in shape ({skip[:3]}) — the model "
                f"differs from the checkpoint; use the source run's model section"
            )
    check_fits(model, {**{k: own[k] for k in skip}, **{k: v for k, v in saved.items() if k not in skip}}, path)
    model.load_state_dict({k: v for k, v in saved.items() if k not in skip}, strict=False)
    return {"checkpoint": str(found), "loaded": len(saved) - len(skip), "reinitialised": skip}


_STATE_KEYS = ("loop", "lrs", "ranks")  # what every state.pt save_last writes holds (resume reads them)


def read_state(path: Path) -> dict:
    """state.pt, loaded with ``weights_only=True``; anything that is not a cxr checkpoint — damaged,
    truncated, or holding pickled objects other than tensors and plain containers (a hostile file
    that would run code under ``weights_only=False``) — is one CxrError line that says not to
    use the unsafe option that torch's own message suggests."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        raise CxrError(f"{path}: unreadable checkpoint ({load_error_line(err)}) — {_CORRUPT_FIX}") from None
    except Exception as err:  # noqa: BLE001 (UnpicklingError, RuntimeError, EOFError, IndexError... of a bad pickle)
        raise CxrError(
            f"{path}: not a cxr checkpoint ({load_error_line(err)}) — it is damaged or holds objects "
            f"other than tensors; do not load it with weights_only=False; {_CORRUPT_FIX}"
        ) from None
    missing = [k for k in _STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CxrError(
            f"{path}: not a cxr checkpoint (no {', '.join(missing)}) — do not load it with "
            f"weights_only=False; {_CORRUPT_FIX}"
        )
    return state


def load_checkpoint(accelerator, ckpt: str | Path, *, model, optimizer=None, scheduler=None) -> dict:
    """Restore weights, optimizer, scheduler, scaler and this rank's RNG states from ``ckpt``;
    return the loop state saved with it (``state["rank"]`` is this rank's own entry).

    With a different world size the RNG streams cannot continue exactly: each rank then
    keeps its fresh seed and ``state["rank"]`` is None (the caller reports it)."""
    ckpt = Path(ckpt)
    path = ckpt / STATE
    if not path.is_file():
        raise CxrError(f"{path}: missing — '{ckpt.name}' holds weights only; resume from a 'last' checkpoint")
    state = read_state(path)
    if _is_deepspeed(accelerator):
        if not (ckpt / DEEPSPEED_DIR).is_dir():
            raise CxrError(
                f"{ckpt}: no deepspeed/ folder — this checkpoint was not written under DeepSpeed; "
                f"resume it with the launcher config it was trained with"
            )
        model.load_checkpoint(
            str(ckpt / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
    else:
        load_weights(unwrap_model(accelerator, model), ckpt)
        if optimizer is not None and state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if accelerator.scaler is not None and state.get("scaler") is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    same_world = state.get("world_size") == accelerator.num_processes
    state["rank"] = state["ranks"][accelerator.process_index] if same_world else None
    if state["rank"] is not None:
        set_rng_state(state["rank"]["rng"])
    return state
