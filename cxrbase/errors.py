"""The one error type of cxr and the CLI boundary that prints it.

Raise ``CxrError(f"{path}: {what} — {how to fix}")`` anywhere; CLIs wrap their
``main`` with :func:`cli_entry`, which prints the message without a traceback
(``--debug`` or ``CXR_DEBUG=1`` shows it) and exits with status 2. A full disk, a
read-only or forbidden output (ENOSPC, EDQUOT, EROFS, EACCES) is reported there the
same way, once for every CLI (shards and training), naming the file. On every exit
path it also tears down a torch.distributed process group that the command's
launcher set up (see :func:`destroy_process_group`).
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable, Sequence


class CxrError(Exception):
    """A user-facing error: the message names the file/row and the fix."""


# errno → (what, how to fix); after freeing space, pack and training resume where they stopped
_AGAIN = "; a re-run resumes"
_STORAGE_ERRORS = {
    errno.ENOSPC: ("no space left on device", "free space or choose another --out / checkpoint.run_dir" + _AGAIN),
    errno.EDQUOT: ("disk quota exceeded", "free space or choose another --out / checkpoint.run_dir" + _AGAIN),
    errno.EROFS: ("read-only file system", "choose a writable --out / checkpoint.run_dir"),
    errno.EACCES: ("permission denied", "fix its permissions, or choose another path (--out / checkpoint.run_dir)"),
}


def storage_error_message(err: OSError) -> str | None:
    """One line for a full, read-only or forbidden output (names the file), else None."""
    known = _STORAGE_ERRORS.get(err.errno) if err.errno is not None else None
    if known is None:
        return None
    where = err.filename if err.filename is not None else "output"
    return f"{where}: {known[0]} — {known[1]}"


def cli_entry(main: Callable[[Sequence[str] | None], int | None]) -> Callable[[Sequence[str] | None], int]:
    """Wrap a CLI ``main(argv)`` so a CxrError prints as one line and exits 2."""

    def wrapped(argv: Sequence[str] | None = None) -> int:
        args = list(sys.argv[1:] if argv is None else argv)
        debug = "--debug" in args or os.environ.get("CXR_DEBUG") == "1"
        if "--debug" in args:
            args.remove("--debug")
        try:
            return int(main(args) or 0)
        except CxrError as err:
            if debug:
                raise
            return _report(f"error: {err}")
        except BrokenPipeError:
            # output piped into `head` and closed: not an error of ours
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except OSError as err:
            message = storage_error_message(err)
            if debug or message is None:
                raise
            return _report(f"error: {message}")
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            destroy_process_group()

    return wrapped


def _report(line: str) -> int:
    """Print the one-line error; under torchrun / ``accelerate launch`` also hand it to the launcher.

    The launcher answers a worker's non-zero exit with a ~40-line ``ChildFailedError`` traceback
    printed after everything the workers wrote, which buries this line. torchelastic reads the file
    named by ``TORCHELASTIC_ERROR_FILE`` (its documented error-file protocol, what its ``@record``
    writes for an exception) and shows its message as the ``traceback :`` field of the root cause,
    the last field of its report; so the launcher's report ends with this line instead of a link."""
    print(line, file=sys.stderr, flush=True)
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        import json
        import time

        try:
            with open(path, "w") as fh:
                json.dump({"message": line, "timestamp": int(time.time())}, fh)
        except OSError:
            pass  # the line above is printed anyway
    return 2


def destroy_process_group() -> None:
    """Tear down an initialised torch.distributed process group (no-op without torch loaded).

    Left to interpreter shutdown, gloo's threads are destroyed while still joinable: a rank
    that finishes first (under ``accelerate launch``, every rank but 0 returns right after
    the gather of ``cxr.evaluate`` / ``cxr.tools.explain``) then aborts with "terminate called
    without an active exception" (SIGABRT). This frees the group only if nothing else holds
    it: a module imported after the group was created can keep it in its default arguments
    (see ``cxr.runs.distributed.import_before_process_group``). torch is looked up, never
    imported: shards/ runs without it.
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    torch.distributed.destroy_process_group()
