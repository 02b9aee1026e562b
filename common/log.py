"""Messages of every entry point through `logging`: one `logging.getLogger(__name__)` per module,
configured once by the command line (`-v`/`-q`, on every CLI through `stores.cli.Parser`).

What a command says goes to stdout as plain lines, as it always did; warnings and errors go to
stderr prefixed `WARNING:`/`ERROR:`. Levels:

    -qq  errors only          -q  warnings and errors (no progress bars)
         (default) what each step does, progress bars
    -v   also the details: paths, keys, leases, settings (lines prefixed with the module)
    -vv  also other libraries' debug messages (botocore, submitit, ...)

Library use (`from pipeline.extract import build_features`) configures nothing: as with any
library, the caller's logging settings decide (INFO messages of `pipeline.*`, `training.*`,
`stores.*`, `slurm.*` are dropped under Python's default WARNING level)."""

import argparse
import logging
import sys
import warnings
from contextlib import contextmanager

PACKAGES = ("common", "pipeline", "training", "stores", "slurm", "ptgrm", "bench")
# other libraries' messages that the project says better itself (not shown)
SAID_BETTER = ("No pretrained weights loaded",)  # open_clip; pipeline/encoders.py names the weights
_state = {"verbosity": (0, 0)}  # of the last configure()


def add_verbosity(p: argparse.ArgumentParser) -> None:
    """-v/-q on `p`. SUPPRESS as the default, so that a subcommand's parser (which has them too)
    never resets what was given before the subcommand: `python -m training -q train` is quiet."""
    g = p.add_argument_group("output")
    g.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="say more: -v adds paths, keys, leases and settings; -vv other libraries' debug too",
    )
    g.add_argument(
        "-q",
        "--quiet",
        action="count",
        default=argparse.SUPPRESS,
        help="say less: -q warnings and errors only, no progress bars; -qq errors only",
    )


class _Handler(logging.Handler):
    """INFO and below to the current sys.stdout, WARNING and above to the current sys.stderr
    (looked up at each message, so redirections made after configuration are followed)."""

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith(PACKAGES) and any(
            s in record.getMessage() for s in SAID_BETTER
        ):
            return
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never take the program down
            self.handleError(record)


class _Format(logging.Formatter):
    def __init__(self, detailed: bool):
        super().__init__()
        self.detailed = detailed

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname}: {text}"
        elif self.detailed and record.levelno < logging.INFO:
            text = f"[{record.name}] {text}"
        return text


def level_of(verbose: int = 0, quiet: int = 0) -> int:
    """The level of the project's loggers for `-v` x verbose and `-q` x quiet."""
    d = verbose - quiet
    return logging.DEBUG if d > 0 else {0: logging.INFO, -1: logging.WARNING}.get(d, logging.ERROR)


def configure(verbose: int = 0, quiet: int = 0) -> None:
    """Set the levels and the one handler (idempotent: a second call replaces the first's)."""
    verbose, quiet = verbose or 0, quiet or 0
    level = level_of(verbose, quiet)
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(h)
    handler = _Handler()
    handler.setFormatter(_Format(detailed=verbose > 0))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose - quiet >= 2 else max(level, logging.WARNING))
    for name in PACKAGES:
        logging.getLogger(name).setLevel(level)
    # warnings.warn goes through the same handler, as one line: "WARNING: <message>"
    warnings.formatwarning = lambda msg, cat, *a, **k: f"{msg}"
    logging.captureWarnings(True)
    _state["verbosity"] = (verbose, quiet)


def flags() -> list[str]:
    """The -v/-q flags of the last configure(), for a command this one starts."""
    verbose, quiet = _state["verbosity"]
    return ["-v"] * verbose + ["-q"] * quiet


def verbosity() -> tuple[int, int]:
    """(-v count, -q count) of the last configure(): what a SLURM job passes to its workers, which
    configure() with it (a worker is another process, on another node)."""
    return _state["verbosity"]


def from_args(args: argparse.Namespace) -> None:
    """configure() from the -v/-q counts parsed by a `stores.cli.Parser`."""
    configure(getattr(args, "verbose", 0), getattr(args, "quiet", 0))


@contextmanager
def _at_level(level: int, raise_only: bool, handler: logging.Handler | None = None):
    loggers = [logging.getLogger(name) for name in PACKAGES]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), level) if raise_only else level)
        if handler:
            lg.addHandler(handler)
    try:
        yield
    finally:
        for lg, old in zip(loggers, levels):
            lg.setLevel(old)
            if handler:
                lg.removeHandler(handler)


def quiet():
    """Within: the project's loggers say warnings and errors only (a benchmark's set-up)."""
    return _at_level(logging.WARNING, raise_only=True)


@contextmanager
def collect(level: int = logging.INFO):
    """Within: every message of the project's loggers at `level` and above is also appended, as
    its text, to the list this yields (what a caller shows or checks)."""
    lines: list[str] = []
    handler = logging.Handler(level)
    handler.emit = lambda record: lines.append(record.getMessage())
    with _at_level(level, raise_only=False, handler=handler):
        yield lines


def bars() -> bool:
    """Whether progress bars are shown (not under -q)."""
    return level_of(*_state["verbosity"]) <= logging.INFO
