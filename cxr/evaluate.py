"""`python -m cxr.evaluate` — infer trained members on a split, ensemble them, report.

    python -m cxr.evaluate --runs RUN [RUN ...] --shards DIR --split test --out REPORT
    accelerate launch [--multi_gpu --num_processes N] -m cxr.evaluate ...   # distributed
    python -m cxr.evaluate --from-predictions REPORT/predictions.parquet --out REPORT2

A separate job from training that never trains: every member is rebuilt from its
run's ``config.yaml`` (``model:`` → ``build_model``), loads ``checkpoints/best``
without unpickling code, and runs in eval mode under ``torch.inference_mode``. The
split is read once and every member scores each batch. Under a launcher each rank
infers a disjoint part of the split; keys and probabilities are gathered on rank 0,
which checks that every image of the split was scored exactly once and writes
(atomically) ``predictions.parquet``, ``aucs.csv``, ``thresholds.json``,
``metrics.csv``, ``calibration.csv``, ``calibration.json``, ``subgroups.csv``, ``members.json``,
``roc.png``, ``pr.png``, ``reliability.png`` and ``report.md``. The per-image columns of
the splits table the shards were packed from (patient, age, sex, view; follow-up from the
image name) ride along in predictions.parquet: they drive the patient-level bootstrap and
the subgroups.

predictions.parquet is long: one row per (split, member, key) with one probability column per label
(the shards' label names: the 14 NIH ones or a generic table's, float64) and the ground-truth columns ``true_<Label>``
(0/1); the ensemble is member ``ensemble``; both the evaluated split and the threshold
split are in it, so ``--from-predictions`` needs nothing else. The ensemble is always
recomputed from the member rows (``--ensemble``), in both modes, so a re-analysis
reproduces the tables exactly.

Resolution policy: all members must share the shards' label set, else they are
refused. Each member is inferred at its own training resolution: members are grouped
by resolution and the split is read once per distinct resolution (the loader decodes
and resizes each image to that resolution, with the same filter as training used),
then the groups' scores are joined by key. One pass per resolution, not one decode
resized per member, because it reuses the training loaders unchanged (derived
``resN/`` shards where packed, so high resolutions never decode the 1024² masters
twice) and every member sees exactly the pixels it was trained on; the extra decodes
cost a few passes at the lower resolutions, which are the cheap ones. ``--resolution R``
instead evaluates every member at R×R (the suite's models take any input size); the
report lists each member's training resolution next to it.

Where the parts live: cxr.evaluation.inference (members, their models, inference, ensemble),
cxr.evaluation.predictions (predictions.parquet and members.json), cxr.evaluation.report (the analysis, tables,
figures and report.md) and cxr.evaluation.metrics (the formulas); this module is the CLI and the
orchestration.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxr.evaluation.cli_args import build_parser
from cxr.evaluation.inference import infer_runs, process_state, with_ensemble
from cxr.evaluation.notes import data_notes, member_notes
from cxr.evaluation.predictions import check_score_sets, read_members, read_predictions, write_predictions
from cxr.evaluation.report import ENSEMBLE, ScoreSet
from cxr.evaluation.subgroups import attach_meta
from cxr.runs.open import EvalOptions, check_distinct
from cxrbase.atomic import atomic_folder, remove_stale_folders
from cxrbase.errors import CxrError, cli_entry
from cxrbase.lock import FolderLock
from shards import remote

# ------------------------------------------------------------ orchestration --


def load_saved(args: argparse.Namespace) -> tuple[dict[str, ScoreSet], list[dict[str, Any]]]:
    """--from-predictions: the saved scores and, if beside them, members.json."""
    path = Path(args.from_predictions)
    if not path.is_file():
        raise CxrError(f"{path}: predictions file not found — pass REPORT/predictions.parquet")
    return read_predictions(path), read_members(path)


def _splits_needed(args: argparse.Namespace) -> list[str]:
    thr = None if args.thresholds_from in (None, "none") else args.thresholds_from
    return [args.split] + ([thr] if thr and thr != args.split else [])


def _context(args: argparse.Namespace, source: str, notes: Sequence[str] = ()) -> dict[str, Any]:
    notes = list(notes)
    if args.thresholds_from == args.split:
        notes.append(
            f"thresholds were tuned on the evaluated split `{args.split}` itself: the threshold metrics are optimistic"
        )
    return {
        "ensemble": args.ensemble,
        "bootstrap": args.bootstrap,
        "seed": args.seed,
        "alpha": args.alpha,
        "thresholds_from": args.thresholds_from,
        "source": source,
        "notes": notes,
        "label_mapping": _label_mapping(args),
    }


def _label_mapping(args: argparse.Namespace) -> dict[str, Any] | None:
    """The shards manifest's ``label_mapping`` (tables of shards.datasets), for report.md; None otherwise."""
    from shards.manifest import load_manifest

    if not getattr(args, "shards", None):
        return None
    try:
        return load_manifest(remote.location(args.shards)).get("label_mapping")
    except CxrError:  # no manifest there: inference has already said so, or scores came from files
        return None


def _splits_table(args: argparse.Namespace) -> Path | None:
    """The splits table whose per-image columns (patient, age, sex, view …) the split gets: --splits,
    else the shards' own (inference only; --from-predictions uses the columns saved with the scores)."""
    from cxr.evaluation.subgroups import packed_table

    if args.splits:
        return Path(args.splits)
    return None if args.from_predictions else packed_table(args.shards)


def _checked_scores(
    args: argparse.Namespace, per_split: dict[str, ScoreSet], source: str, plan: Any
) -> tuple[dict[str, ScoreSet], dict[str, str], bool, Any]:
    """The scores analyse_and_write analyses: undefined labels dropped (and named), the needed splits
    checked, the splits table's columns attached, the ensemble recomputed. Returns them with the
    dropped labels, whether this is an external evaluation, and the --compare-to AUROCs (or None)."""
    from cxr.evaluation import cross_site

    dropped: dict[str, str] = {}
    is_external = (plan is not None and plan.cross_site) or bool(args.compare_to)
    if args.split in per_split:
        dropped = plan.dropped() if plan is not None else {}
        # all-unknown labels (the shards have the column, no image of the split knows it) always;
        # single-class ones too when evaluating on another data set (their AUROC is undefined)
        per_split, undefined = cross_site.drop_undefined(per_split, args.split, single_class=is_external)
        dropped.update(undefined)
    if dropped:
        print(
            f"cross-site: {len(per_split[args.split].labels)} shared label(s) evaluated"
            + (f"; dropped {'; '.join(f'{k} ({v})' for k, v in dropped.items())}" if dropped else ""),
            file=sys.stderr,
        )
    internal = cross_site.read_internal(args.compare_to) if args.compare_to else None
    for split in _splits_needed(args):
        if split not in per_split:
            raise CxrError(
                f"{source}: no predictions for split {split!r} (has {sorted(per_split)}) — "
                "choose --split/--thresholds-from among those, or --thresholds-from none"
            )
    check_score_sets(per_split, source)  # freshly inferred scores too: nothing is written before this
    per_split = attach_meta(per_split, _splits_table(args), strict=bool(args.splits))
    per_split = {k: with_ensemble(v, args.ensemble) for k, v in per_split.items()}
    return per_split, dropped, is_external, internal


def analyse_and_write(
    args: argparse.Namespace,
    per_split: dict[str, ScoreSet],
    infos: list[dict[str, Any]],
    source: str,
    out: Path | None = None,
    stops: _StopSignals | None = None,
    plan: Any = None,
) -> dict[str, Any]:
    """Ensemble, write predictions, compute every table and the report into ``out`` (default
    --out; main passes the temp folder that replaces --out at the end); return a summary.
    ``plan`` (cxr.evaluation.cross_site.LabelPlan): runs scored on another data set's shards — labels that
    only one side has, or that are all-unknown or single-class on the split, are left out and
    named; with --compare-to the report puts internal and external AUROCs side by side."""
    from cxr.evaluation import cross_site
    from cxr.evaluation.report import analyse, write_outputs

    out = Path(args.out) if out is None else out
    per_split, dropped, is_external, internal = _checked_scores(args, per_split, source, plan)
    tuning_split = None if args.thresholds_from in (None, "none") else args.thresholds_from
    notes = data_notes(per_split.get(tuning_split), tuning_split) + member_notes(infos)
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    write_predictions(out, per_split, infos)
    scores = per_split[args.split]
    if stops is not None:
        stops.phase = f"the analysis ({args.bootstrap} bootstrap resamples)"
    t0 = time.perf_counter()
    analysis = analyse(
        scores,
        per_split.get(tuning_split) if tuning_split else None,
        tuning_split=tuning_split,
        n_boot=args.bootstrap,
        seed=args.seed,
        alpha=args.alpha,
        resample=args.resample,
        subgroups=args.subgroups,
        calibrate=not args.no_calibration,
    )
    seconds = {"analysis": time.perf_counter() - t0}
    if stops is not None:
        stops.phase = "writing the report"
    context = _context(args, source, notes)
    external = None
    if dropped or is_external:
        external = cross_site.comparison(analysis.aucs, internal, dropped)
        cross_site.write_comparison(out, external)
        context["sections"] = cross_site.section(plan, dropped, external, args.compare_to, args.split)
    seconds.update(
        write_outputs(
            out,
            analysis,
            scores,
            split=args.split,
            context=context,
            members=infos,
            figures=not args.no_figures,
        )
    )
    return {
        "analysis": analysis,
        "scores": scores,
        "seconds": seconds,
        "cross_site": (external, dropped),
    }


class _Stopped(BaseException):
    """Raised in the main thread by a stop signal (SIGTERM, SIGUSR1) while the evaluation runs.

    A BaseException, as KeyboardInterrupt is: it can surface inside any ``except Exception`` on the way (an
    image decoder's, which then called the sample corrupt and the evaluation failed with exit 1, not 75)."""

    def __init__(self, signum: int, phase: str):
        super().__init__(signum, phase)
        self.signum, self.phase = signum, phase


class _StopSignals:
    """SIGTERM / SIGUSR1 (Slurm's preemption warning, ``scancel``) stop the evaluation with a message.

    Unlike training, an evaluation has nothing to checkpoint: the signal raises :class:`_Stopped`
    wherever the main thread is, the report's temp folder is removed (--out is replaced only
    at the very end, as a whole), and main exits EXIT_REQUEUE so Slurm wrappers requeue it as
    they requeue training. ``phase`` says what was interrupted; None once --out is in place,
    after which a signal no longer stops anything.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.phase: str | None = "start-up (loading the members)"
        self.previous: dict = {}

    def _handler(self, signum, frame) -> None:
        if self.phase is not None:
            raise _Stopped(signum, self.phase)

    def __enter__(self) -> _StopSignals:
        self.previous = {sig: signal.signal(sig, self._handler) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _lock_out(out: Path) -> FolderLock:
    """Hold ``.OUT.lock`` beside --out (the folder itself is replaced as a whole): two evaluations
    never write one report. Refuse an --out that exists and is not a report of ours."""
    if out.exists() and not out.is_dir():
        raise CxrError(f"{out}: --out is a file — pass a folder for the report")
    lock = FolderLock(
        out,
        out.parent / f".{out.name}.lock",
        busy="another evaluation ({who}) is writing this report folder — wait for it or use another --out",
        unwritable="cannot create the report's lock ({strerror}) — choose a writable --out",
    ).acquire()
    if out.is_dir():
        held = sorted(p.name for p in out.iterdir())
        if held and not {"report.md", "predictions.parquet"} & set(held):
            lock.release()
            raise CxrError(
                f"{out}: --out holds files that are not a cxr.evaluate report ({', '.join(held[:5])}"
                f"{', …' if len(held) > 5 else ''}) — an evaluation replaces its --out as a whole; "
                "choose a new or empty folder"
            )
    if lock.stale:
        print(f"warning: {lock.stale}", file=sys.stderr)
    remove_stale_folders(out)  # a killed evaluation's temp folders; safe under the lock
    return lock


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.from_predictions and args.runs:
        p.error("give either --runs (infer) or --from-predictions (re-analyse), not both")
    if not args.from_predictions and not args.runs:
        p.error("--runs is required unless --from-predictions is given")
    if args.runs and not args.shards:  # every run records the shards it trained on
        from cxr.runs.open import run_shards

        args.shards = run_shards(args.runs[0])
        print(f"shards: {args.shards} (data.shards of {args.runs[0]}; --shards to choose)", file=sys.stderr)
    if args.bootstrap < 0 or not 0 < args.alpha < 1:
        p.error("--bootstrap must be >= 0 and --alpha in (0, 1)")
    if args.ood and not args.shards:
        p.error("--ood needs --shards (the gate scores the split's images)")


def _summary_line(result: dict[str, Any], args: argparse.Namespace, elapsed: float) -> str:
    scores, aucs = result["scores"], result["analysis"].aucs
    mean = aucs[aucs["label"] == "mean"].set_index("member")
    focus = ENSEMBLE if ENSEMBLE in mean.index else mean.index[-1]
    row = mean.loc[focus]
    ci = f" [{row.ci_low:.3f}, {row.ci_high:.3f}]" if np.isfinite(row.ci_low) else ""
    n_members = len([m for m in scores.scores if m != ENSEMBLE])
    where = f" on {result['ranks']} rank(s)" if result.get("ranks") else " from saved predictions"
    return (
        f"evaluated {n_members} member(s) on {scores.n} images of '{args.split}'{where} in {elapsed:.1f} s "
        f"({scores.n * n_members / max(elapsed, 1e-9):.0f} member-images/s); "
        f"{focus} mean AUROC {row.auroc:.3f}{ci}"
    )


@cli_entry  # also tears down the launcher's process group on every exit path (cxrbase.errors)
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    start = time.perf_counter()
    out = Path(args.out)
    if out.name in ("", "..") or out.is_symlink():  # `.`, `..`, a link: the folder itself, by its real name
        out = out.resolve()
    try:
        with _StopSignals() as stops:
            return _evaluate(args, out, start, stops)
    except _Stopped as stop:
        from cxr.runs.run_log import EXIT_REQUEUE

        print(
            f"stopped by {signal.Signals(stop.signum).name} during {stop.phase}: nothing written to {out} "
            f"(an earlier report there is left as it was) — exit {EXIT_REQUEUE} (requeue: the same command "
            "evaluates again)",
            file=sys.stderr,
        )
        return EXIT_REQUEUE


def eval_options(args: argparse.Namespace) -> EvalOptions:
    """The flags that say how to read the split (cxr.runs.open.EvalOptions)."""
    return EvalOptions.from_flags(args)


def run_label_plan(args: argparse.Namespace) -> Any:
    """The labels the runs (their first member) share with --shards (cxr.evaluation.cross_site.LabelPlan)."""
    from cxr.evaluation.inference import member_label_plan, member_names
    from cxr.runs.open import read_member

    return member_label_plan([read_member(args.runs[0], member_names(args.runs[:1])[0])], remote.location(args.shards))


def _evaluate(args: argparse.Namespace, out: Path, start: float, stops: _StopSignals) -> int:
    lock, plan = None, None
    try:
        if args.from_predictions:
            lock = _lock_out(out)
            per_split, infos = load_saved(args)
            source = f"predictions {args.from_predictions}"
            state = None
        else:
            if args.threads:
                import torch

                torch.set_num_threads(args.threads)
            check_distinct(args.runs)
            state = process_state(args.cpu)
            if state.is_main_process:  # the writer: refuse a busy --out before any inference
                lock = _lock_out(out)

            def ready(members) -> None:
                stops.phase = "inference"
                if state.is_main_process:
                    print(
                        f"evaluating {len(members)} member(s) on split(s) {', '.join(_splits_needed(args))} of "
                        f"{args.shards} → {out}",
                        file=sys.stderr,
                        flush=True,
                    )

            per_split, infos = infer_runs(args.runs, eval_options(args), state, _splits_needed(args), on_ready=ready)
            if per_split is None:  # not rank 0: rank 0 writes everything
                return 0
            source = f"runs {' '.join(map(str, args.runs))}; shards {args.shards}"
            plan = run_label_plan(args)
        with atomic_folder(out) as tmp:
            result = analyse_and_write(args, per_split, infos, source, tmp, stops, plan=plan)
            result["ranks"] = None if args.from_predictions else state.num_processes
            ood = None
            if args.ood:
                from cxr.tools.ood import report_ood

                stops.phase = "the OOD gate"
                ood = report_ood(args.ood, args.shards, args.split, result["scores"], tmp).replace(str(tmp), str(out))
            stops.phase = "writing the report"
        stops.phase = None  # --out is complete: a signal from here on stops nothing
    finally:
        if lock is not None:
            lock.release()
    from cxr.evaluation.report import format_stdout_table

    print(format_stdout_table(result["analysis"].aucs))
    external, dropped = result["cross_site"]
    if external is not None:
        from cxr.evaluation.cross_site import format_table

        print(f"external validation ({out / 'cross_site.csv'}):\n{format_table(external, dropped)}")
    print(_summary_line(result, args, time.perf_counter() - start))
    if ood is not None:
        print(ood)
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
