"""Validation of a training (cxr/training/trainer.py): predict the val split (each image on exactly
one rank), gather all predictions to every rank, and score the whole set there (identical on all
ranks). What the scores are depends on the model: :class:`ClassifierValidation` (loss + SPEC
metrics per label) or, for the OOD gate's autoencoder (cxr/models/ood_ae.py), which has no labels
to rank, :class:`ReconstructionValidation` (loss only). :func:`validation_for` picks one."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from accelerate.utils import gather_object

from cxr.config import Config
from cxr.data import to_device
from cxr.evaluation.metrics import epoch_metrics
from cxr.runs.run_log import steps_log
from cxr.training.setup import label_names, open_loader
from cxr.training.state import TrainerLike
from cxrbase.errors import CxrError


@torch.no_grad()
def gather_predictions(trainer: TrainerLike) -> tuple[list, np.ndarray, np.ndarray] | None:
    """(keys, logits, labels) of the whole val split on every rank, rows sorted by key so that
    the result does not depend on the number of ranks; the trainer's unwrapped model predicts.

    None when the trainer's stop flag is agreed: checked after each of the first k batches, k the
    fewest batches of any rank (ranks may hold one batch more than others), and once at the end."""
    cfg, accelerator, net, stop = trainer.cfg, trainer.accelerator, trainer.unwrapped_model, trainer.stop
    device = accelerator.device
    loader, batches = open_loader(
        trainer.loader_fn, cfg, "val", accelerator.process_index, accelerator.num_processes, epoch=0, train=False
    )
    checks = min(gather_object([len(loader)])) if stop is not None else 0
    net.eval()
    keys, logits, labels = [], [], []
    for i, batch in enumerate(batches):
        if i < checks and stop.agreed():
            net.train()
            return None
        image = to_device(batch, device)
        meta = batch["meta"].to(device, non_blocking=True) if cfg.model.metadata != "none" else None
        if cfg.model.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        with accelerator.autocast():
            logits.append(net(image, meta).float())
        labels.append(batch["labels"].float())
        keys.extend(batch["key"])
    net.train()
    if stop is not None and stop.agreed():
        return None
    n = cfg.model.num_labels
    # .cpu(): a sync point, once per validation
    local = (
        keys,
        torch.cat(logits).cpu().numpy() if logits else np.zeros((0, n), np.float32),
        torch.cat(labels).numpy() if labels else np.zeros((0, n), np.float32),
    )
    parts = gather_object([local])
    all_keys = [k for part in parts for k in part[0]]
    if len(set(all_keys)) != len(all_keys) or not all_keys:
        raise CxrError(
            f"validation: {len(all_keys)} predictions for {len(set(all_keys))} distinct images — "
            f"the val loader must deliver every image exactly once across ranks"
        )
    order = np.argsort(np.array(all_keys))
    z = np.concatenate([part[1] for part in parts])[order]
    y = np.concatenate([part[2] for part in parts])[order]
    return [all_keys[i] for i in order], z, y


class ClassifierValidation:
    """A multi-label classifier: the loss (with the model's L2 penalty when it has one) and the
    SPEC metrics per label (cxr.evaluation.metrics) of the whole val split."""

    shows_auroc = True  # the epoch line shows val_mean_auroc

    def __call__(self, trainer: TrainerLike) -> dict | None:
        """{"val_loss", "val_mean_auroc", "val_<metric>", ..., "keys": [n], "probs": [n, k]},
        or None when stopped (:func:`gather_predictions`)."""
        gathered = gather_predictions(trainer)
        if gathered is None:
            return None
        keys, z, y = gathered
        device = trainer.accelerator.device
        loss = trainer.loss_fn(torch.from_numpy(z).to(device), torch.from_numpy(y).to(device))
        if trainer.l2_weights:
            loss = loss + trainer.unwrapped_model.l2_penalty(torch.float32)
        probs = 1.0 / (1.0 + np.exp(-z.astype(np.float64)))
        out = {"val_loss": float(loss.item())}
        out.update(self.scores(trainer.cfg, y, probs))
        out.update(keys=keys, probs=probs)
        return out

    def scores(self, cfg: Config, y: np.ndarray, probs: np.ndarray) -> dict:
        with warnings.catch_warnings(record=True) as caught:  # zero-denominator notes: to train.log, not the console
            warnings.simplefilter("always")
            out = {f"val_{k}": float(v) for k, v in epoch_metrics(y, probs, labels=label_names(cfg)).items()}
        for w in caught:
            steps_log.info("validation: %s", w.message)
        return out


class ReconstructionValidation(ClassifierValidation):
    """The OOD gate's autoencoder (model.name=ood_ae, loss.name=ssim_recon): its output is one
    reconstruction score per image, not one logit per label — the loss only, and
    ``val_mean_auroc`` NaN (metrics.csv keeps its columns). "probs" holds the sigmoid of the
    score (the val predictions' columns "0", "1"...)."""

    shows_auroc = False

    def scores(self, cfg: Config, y: np.ndarray, probs: np.ndarray) -> dict:
        return {"val_mean_auroc": float("nan")}


# model.name → its validation; every other model is a classifier
VALIDATIONS = {"ood_ae": ReconstructionValidation}


def validation_for(cfg: Config) -> ClassifierValidation:
    """The validation of the configured model."""
    return VALIDATIONS.get(cfg.model.name, ClassifierValidation)()
