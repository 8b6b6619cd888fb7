"""Can OmegaConf or tyro replace cxr.config's hand-written coercion and --help builder?

Runs the same inputs through three loaders and prints one table:

- ``hand``      cxr.config.load_config as shipped (yaml.safe_load + ``_coerce`` + ``field_docs``)
- ``omegaconf`` a prototype below: OmegaConf structured config of ``Config``, YAML file and
  ``OmegaConf.from_dotlist(overrides)`` merged into it, ``OmegaConf.to_object`` builds the
  dataclasses; library errors wrapped into one ``CxrError`` line (file, full_key, first line)
- ``tyro``      a prototype below: the YAML file and the ``section.key=value`` overrides turned
  into ``--section.key value`` tokens for ``tyro.cli(Config)``; its boxed error text joined
  into one line

Measured: lines of code replaced vs added (non-blank, non-comment source lines of the
functions); how many error cases of tests/test_config.py (plus the CLI tests' and two YAML
file cases) still give one line naming the key/file and the fix (the words the tests
require); whether valid inputs build the same ``Config`` and the same ``config_hash``
(shipped configs, the tests' overrides); whether --help keeps the tested contract; the
import time each library adds after ``import cxr.config`` (``-X importtime``, median).

    python bench/config_libs.py [--imports 10] [--append bench/RESULTS.md]

A library that is not installed is skipped and the table says so.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import io
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import typing
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

import cxr.config as C  # noqa: E402
from cxrbase.errors import CxrError  # noqa: E402

# ---------------------------------------------------------------------------- inputs
# The error contract of tests/test_config.py (read from its parametrize marker, so it stays in sync)
# plus the in-process/CLI tests' cases; each: (overrides, YAML text or None, words the message must hold).
sys.path.insert(0, str(ROOT / "tests"))
import test_config  # noqa: E402

_MARK = next(m for m in test_config.test_bad_key_or_value_names_key_and_choices.pytestmark if m.name == "parametrize")
ERROR_CASES = [([o], None, words) for o, words in _MARK.args[1]] + [
    (["optim.nme=adam"], None, ["optim.nme", "lr"]),  # test_cli_bad_config_is_one_line
    (["train.best_metric=accuracy"], None, ["val_loss", "val_mean_auroc"]),  # test_cli_in_process_errors
    ([], "train:\n  epoch: 3\n", ["{file}", "train.epoch", "epochs"]),  # a YAML file: names the file
    ([], "optim:\n  lr: fast\n", ["{file}", "optim.lr", "number"]),
]
VALID = (
    [
        ("defaults", None, []),
        (
            "test_defaults_and_typed_overrides",
            None,
            [
                "optim.lr=3e-4",
                "optim.betas=[0.8, 0.95]",
                "loss.cap=null",
                "train.epochs=7",
                "model.name=cnn",
                "checkpoint.run_dir=/tmp/x",
                "train.restore_best=false",
                "train.mixed_precision=no",
            ],
        ),
        (
            "round trip: model options, tuple, Optional",
            None,
            ["model.name=cnn", "model.stem_size=64", "optim.betas=[0.5,0.6]", "loss.cap=20"],
        ),
        (
            "cbam options + Literal",
            None,
            ["model.name=densenet121_cbam", "model.head_dropout=0.25", "model.metadata=mlp"],
        ),
        ("int where float (hash-sensitive)", None, ["optim.lr=1", "schedule.warmup_epochs=0"]),
        ("bool|str, Optional[int]", None, ["data.pin_memory=false", "data.eval_batch_size=null", "data.seed=3"]),
        (
            "bookkeeping keys",
            None,
            [
                "checkpoint.run_dir=elsewhere",
                "logging.log_every=1",
                "train.threads=3",
                "checkpoint.resume=never",
                "data.num_threads=7",
            ],
        ),
    ]
    + [
        (c, None, [c])
        for c in ("optim.lr=0.5", "data.resolution=512", "train.seed=1", "model.dropout=0.1", "loss.name=focal")
    ]
    + [(f"shipped {p.stem}", p, []) for p in sorted((ROOT / "cxr" / "configs").glob("*.yaml"))]
)
# the survival rows of the table: (feature, VALID names that exercise it)
FEATURES = [
    ("section.key=value overrides", ["test_defaults_and_typed_overrides", "bookkeeping keys"]),
    (
        "Optional fields (loss.cap=null, =20)",
        ["test_defaults_and_typed_overrides", "round trip: model options, tuple, Optional"],
    ),
    ("tuple fields (optim.betas)", ["round trip: model options, tuple, Optional"]),
    ("Literal fields (incl. mixed_precision=no)", ["test_defaults_and_typed_overrides", "cbam options + Literal"]),
    ("nested data config (data.*, seed follows)", ["bool|str, Optional[int]", "data.resolution=512", "train.seed=1"]),
    ("flat model options (model.stem_size)", ["round trip: model options, tuple, Optional", "cbam options + Literal"]),
]


NOTE = """\
Columns: LOC = non-blank source lines of cxr.config functions the prototype makes unnecessary
(-) vs the prototype's own (+); "errors as good" = one line holding every word
tests/test_config.py requires (the valid keys/choices, "number", "integer", "true or false", the
file); "name key" = one line naming at least the key or file; same Config / hash = equal to
cxr.config.load_config on the valid inputs (shipped configs, the tests' overrides); --help contract
= test_describe_config_documents_every_field on the library's help text; import ms = cumulative
-X importtime of the library after `import cxr.config`, median (loaded shared machine).

Decision: keep the hand-written coercion and help (cxr/config.py's docstring says why). Both
libraries build the same dataclasses, so Config and hash survive, and each would remove ~60 net
lines, but half the error messages lose the valid keys/choices or the fix the tests demand
(OmegaConf: "Did you mean" one key, "could not be converted to Float", a tuple-length error with no
key; tyro: boxed argparse text, Python's int()/float() errors); rewriting them per error type
re-adds what `_coerce` is. tyro reads neither YAML nor `section.key=value`, so the file path and the
override parser stay hand-written under it, and its --help shows `--optim.lr FLOAT`, not the
`optim.lr=` keys users type. Each adds 0.15–0.18 s (median import) to every command's start.
docstring_parser (tyro's dependency) reproduces field_docs exactly but saves ~10 lines for a new
dependency: not taken.
"""


# ---------------------------------------------------------------------------- prototypes
def _read_yaml(path: Path | None) -> dict:
    """Kept from cxr.config in both prototypes: file resolution and its YAML errors."""
    if path is None:
        return {}
    raw = yaml.safe_load(C.resolve_config_path(path).read_text()) or {}
    return {k: dict(v or {}) for k, v in raw.items()}


def _split_options(model: dict) -> tuple[dict, dict, dict]:
    """(model fields, flat options incl. ``options:``, {option: type}); unknown names raise as cxr.config does."""
    names = {f.name for f in dataclasses.fields(C.ModelConfig)}
    options = dict(model.pop("options", None) or {})
    options.update({k: model.pop(k) for k in list(model) if k not in names})
    name = model.get("name", C.ModelConfig.name)
    valid = C.model_options(name) or {}
    for key in options:
        if key not in valid:
            raise CxrError(
                f"unknown key model.{key} for model.name={name} — valid keys of model: "
                f"{', '.join(sorted(names - {'options'}) + list(valid))}"
            )
    return model, options, valid


def _literal_no(raw: dict) -> dict:
    """YAML 1.1 reads a bare ``no`` as false: give Literal fields with a "no" choice their string back."""
    for section, cls in C.SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for key, value in (raw.get(section) or {}).items():
            if value is False and typing.get_origin(hints.get(key)) is typing.Literal and "no" in hints[key].__args__:
                raw[section][key] = "no"
    return raw


def omegaconf_load(path: Path | None, overrides: list[str]) -> C.Config:
    """OmegaConf structured config: the file and ``from_dotlist`` merged into the schema."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    where = str(path) if path else "config"
    try:
        raw = OmegaConf.to_container(OmegaConf.merge(_read_yaml(path), OmegaConf.from_dotlist(list(overrides))))
        model, options, valid = _split_options(raw.get("model") or {})
        if options:
            schema = dataclasses.make_dataclass("options", [(k, valid[k] | None, None) for k in options])
            model["options"] = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(schema), options))
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(C.Config), _literal_no({**raw, "model": model})))
    except OmegaConfBaseException as err:
        key = f"{err.full_key}: " if getattr(err, "full_key", None) else ""
        raise CxrError(f"{where}: {key}{str(err).splitlines()[0]}") from None
    C.check_input_size(cfg)
    return cfg


def tyro_load(path: Path | None, overrides: list[str]) -> C.Config:
    """tyro.cli(Config) fed ``--section.key value`` tokens from the file and the overrides."""
    raw = _read_yaml(path)
    for item in overrides:
        C._apply_override(raw, item)  # kept: tyro has no section.key=value form and no file format
    model, options, valid = _split_options(raw.get("model") or {})
    where = str(path) if path else "config"
    cfg = _tyro_cli(C.Config, _literal_no({**raw, "model": model}), where)
    if options:
        schema = dataclasses.make_dataclass("model", [(k, valid[k]) for k in options])
        cfg.model.options = dataclasses.asdict(_tyro_cli(schema, {"model": options}, where, prefix=False))
    C.check_input_size(cfg)
    return cfg


def _tyro_cli(cls: type, raw: dict, where: str, prefix: bool = True):
    import tyro

    args = [
        tok
        for section, keys in raw.items()
        for key, value in keys.items()
        for tok in [f"--{section}.{key}" if prefix else f"--{key}", *_tokens(value)]
    ]
    out = io.StringIO()
    try:
        with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
            return tyro.cli(cls, args=args, config=(tyro.conf.FlagConversionOff,), use_underscores=True)
    except SystemExit:
        text = " ".join(ln.strip() for ln in out.getvalue().splitlines() if ln.strip().strip("-"))
        raise CxrError(f"{where}: {text}") from None


def _tokens(value) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tokens(v)]
    return ["None" if value is None else str(value)]


def tyro_help() -> str:
    import tyro

    out = io.StringIO()
    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(out):
        tyro.cli(C.Config, args=["--help"], config=(tyro.conf.FlagConversionOff,), use_underscores=True)
    return out.getvalue()


def docstring_parser_docs(cls: type) -> dict[str, str]:
    """The help builder's only custom part, ``field_docs``, through docstring_parser (tyro's dependency)."""
    import docstring_parser

    return {p.arg_name: p.description for p in docstring_parser.parse_from_object(cls).params if p.description}


# ---------------------------------------------------------------------------- measurement
def loc(*fns) -> int:
    """Non-blank, non-comment source lines of these functions (docstrings included)."""
    lines = [ln.strip() for fn in fns for ln in inspect.getsource(fn).splitlines()]
    return sum(1 for ln in lines if ln and not ln.startswith("#"))


def installed(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def message_ok(load, tmp: Path) -> tuple[int, int, list[str]]:
    """(good, one-line, naming the key, examples): good = one line holding every word the tests require."""
    good = one_line = named = 0
    examples = []
    for i, (overrides, text, words) in enumerate(ERROR_CASES):
        path = None
        if text is not None:
            path = tmp / f"case{i}.yaml"
            path.write_text(text)
        try:
            load(path, overrides)
            msg = "(no error)"
        except CxrError as err:
            msg = str(err)
        except Exception as err:  # noqa: BLE001 - a library error that escaped the wrapper is a result
            msg = f"{type(err).__name__}: {err}"
        need = [w.replace("{file}", str(path)) for w in words]
        single = "\n" not in msg and msg != "(no error)"
        one_line += single
        named += single and need[0] in msg  # the first required word is the key (or the file)
        ok = single and all(w in msg for w in need)
        good += ok
        if not ok:
            examples.append(
                f"{' '.join(overrides) or text.strip()!r}: missing "
                f"{[w for w in need if w not in msg] or 'one line'} in {msg[:150]!r}".replace(str(tmp), "TMP")
            )
    return good, one_line, named, examples


def same_config(load) -> tuple[int, int, list[str]]:
    """(same Config, same config_hash, failures) against the hand-written loader."""
    same = same_hash = 0
    fails = []
    for name, path, overrides in VALID:
        ref = C.load_config(path, overrides)
        try:
            got = load(path, overrides)
        except Exception as err:  # noqa: BLE001
            fails.append(f"{name}: {type(err).__name__}: {str(err)[:120]}")
            continue
        same += got == ref
        same_hash += C.config_hash(got) == C.config_hash(ref)
        if got != ref:
            diff = [
                f"{s}.{f.name}: {getattr(getattr(got, s), f.name)!r} vs {getattr(getattr(ref, s), f.name)!r}"
                for s in C.SECTIONS
                for f in dataclasses.fields(getattr(ref, s))
                if getattr(getattr(got, s), f.name) != getattr(getattr(ref, s), f.name)
            ]
            fails.append(f"{name}: {'; '.join(diff)[:160]}")
    return same, same_hash, fails


def feature_ok(load) -> list[bool]:
    valid = {name: (path, overrides) for name, path, overrides in VALID}
    out = []
    for _, names in FEATURES:
        ok = True
        for name in names:
            try:
                ok &= load(*valid[name]) == C.load_config(*valid[name])
            except Exception:  # noqa: BLE001
                ok = False
        out.append(ok)
    return out


def import_ms(module: str | None, repeats: int) -> float:
    """Median ms the module's import adds after ``import cxr.config`` (-X importtime, cumulative)."""
    if module is None:
        return 0.0
    times = []
    for _ in range(repeats):
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", f"import cxr.config; import {module}"],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            check=True,
        )
        line = next(ln for ln in proc.stderr.splitlines() if ln.rstrip().endswith(f"| {module}"))
        times.append(int(line.split("|")[1]) / 1000)
    return statistics.median(times)


def help_contract(text: str) -> bool:
    """tests/test_config.py::test_describe_config_documents_every_field on a help text."""
    return (
        all(f"{s}.{f.name}=" in text for s, cls in C.SECTIONS.items() for f in dataclasses.fields(cls))
        and "Micro-batches per optimizer step" in text
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--imports", type=int, default=10, help="import-time repeats (median)")
    parser.add_argument("--append", type=Path, help="replace the '## config libraries' section of this file")
    args = parser.parse_args(argv)

    coercion = [C._apply_override, C.config_from_dict, C._build_section, C._split_model_options, C._coerce]
    helpers = [C.describe_config, C.field_docs]
    libs = {
        "hand": dict(load=C.load_config, module=None, replaced=0, added=0, help=help_contract(C.describe_config())),
        "omegaconf": dict(
            load=omegaconf_load,
            module="omegaconf",
            replaced=loc(*coercion),
            added=loc(_read_yaml, _split_options, _literal_no, omegaconf_load),
            help=None,
        ),
        "tyro": dict(
            load=tyro_load,
            module="tyro",
            replaced=loc(*coercion[1:]) + loc(*helpers),
            added=loc(_read_yaml, _split_options, _literal_no, tyro_load, _tyro_cli, _tokens, tyro_help),
            help="tyro",
        ),
    }
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, lib in libs.items():
            if lib["module"] and not installed(lib["module"]):
                rows.append((name, f"skipped: {lib['module']} not installed (pip install {lib['module']})"))
                continue
            good, single, named, bad = message_ok(lib["load"], Path(tmp))
            same, same_hash, fails = same_config(lib["load"])
            feats = feature_ok(lib["load"])
            if lib["help"] == "tyro":
                lib["help"] = help_contract(tyro_help())
            version = __import__(lib["module"]).__version__ if lib["module"] else "-"
            rows.append(
                (
                    name,
                    version,
                    f"-{lib['replaced']} +{lib['added']}",
                    f"{good}/{len(ERROR_CASES)} ({single} one line, {named} name key)",
                    f"{same}/{len(VALID)}",
                    f"{same_hash}/{len(VALID)}",
                    {True: "yes", False: "no", None: "none (keep field_docs)"}[lib["help"]],
                    f"{import_ms(lib['module'], args.imports):.0f}",
                    " ".join("y" if f else "n" for f in feats),
                )
            )
            notes += [f"{name} message: {b}" for b in bad] + [f"{name} config: {f}" for f in fails]
    if installed("docstring_parser"):
        same_docs = sum(docstring_parser_docs(cls) == C.field_docs(cls) for cls in C.SECTIONS.values())
        notes.append(
            f"docstring_parser.parse_from_object for field_docs: {same_docs}/{len(C.SECTIONS)} sections "
            f"identical, -{loc(C.field_docs)} +{loc(docstring_parser_docs)} lines, "
            f"{import_ms('docstring_parser', args.imports):.0f} ms import"
        )
    head = (
        "library",
        "version",
        "LOC -repl +add",
        "errors as good",
        "same Config",
        "same hash",
        "--help contract",
        "import ms",
        "features",
    )
    table = [head] + [r if len(r) == len(head) else (r[0], r[1]) + ("",) * (len(head) - 2) for r in rows]
    widths = [max(len(str(r[i])) for r in table) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    lines.append("features: " + "; ".join(f"{i + 1}. {f}" for i, (f, _) in enumerate(FEATURES)))
    lines += notes
    text = "\n".join(lines)
    print(text)
    if args.append:
        from loader import replace_section  # bench/loader.py, on sys.path as this script's folder

        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        command = "python bench/config_libs.py" + (f" --imports {args.imports}" if args.imports != 10 else "")
        replace_section(
            args.append,
            "config libraries",
            f"## config libraries\n\n`{command}` ({platform.machine()}, {os.cpu_count()} cores, "
            f"load average {load}, {date.today()})\n\n```\n{text}\n```\n\n{NOTE}",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
