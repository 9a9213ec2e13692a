"""Where log records go: a quiet console, and the libraries' lines in <workdir>/log.txt.

Orbax, TensorFlow, tfds, JAX and absl log through Python's logging, which absl's app.run sets to INFO
on stderr: over a hundred lines per training run (most of them Orbax's, at every checkpoint), between
the progress bar's frames. Every command here starts through cli.run, which calls `start(level)` once
the flags are parsed and `stop()` when the command ends; `level` is --log_level:

  quiet (default): the console shows ddpm_jax's own lines (INFO and up), anyone's errors, and JAX's
      warnings (a GPU it cannot use, the compiles JAX_LOG_COMPILES asks for); the other libraries'
      lines (Orbax's at every checkpoint, its notes on read-only folders, tfds's, TensorFlow's) go to
      the log file only.
  info: every INFO line on the console too (absl's format, as without this module).
  debug: DEBUG lines as well (absl's --verbosity=1), on the console and in the file.

Why not absl's --verbosity: it says what is logged at all (the root logger's level), not where it
goes, and absl raises it to INFO whenever it is left unset, which is what filled the console. The file
should keep the INFO lines while the console does not show them; --verbosity still sets what is
logged (-v=1 puts DEBUG lines in log.txt and leaves the console quiet).

A command with a workdir (train) calls `to_workdir(workdir)`: from then on every record, from the
start of the process (the earlier ones wait in memory), goes to <workdir>/log.txt, appended under one
header line per start. The file is opened once the workdir exists: the train loop makes it after
checking the config and the data, which must not touch it. A remote workdir (gs://...) cannot be
appended to: there the records go to a local temporary file, copied whole (after the log.txt already
there) to <workdir>/log.txt through fileio when the command ends; a run killed outright keeps only
the local file, whose path the notice names.

C++ logs bypass Python: they are written to file descriptor 2 directly. TensorFlow's come when it is
imported (the oneDNN banner, cpu_feature_guard's note, absl's "All log messages before
absl::InitializeLog() ..."), and TensorFlow >= 2.16 logs through absl's C++ logging, which
TF_CPP_MIN_LOG_LEVEL no longer quiets. So in quiet mode `start` also imports TensorFlow, if anything
imports it, with descriptor 2 sent to a temporary file (`_QuietImport`); its lines then go to the log
as records of the logger "tensorflow.cpp" (INFO, or the W/E/F their prefix says). A crash inside that
import shows nothing on the console: rerun with --log_level=info. Later C++ lines reach stderr
as before (TensorFlow's W/E lines, XLA's); `quiet_native_logs` sets TF_CPP_MIN_LOG_LEVEL=1 for the
libraries that still read it (older TensorFlow, XLA's own logging), unless it is set already.

Only process 0 shows anything below ERROR; process i > 0 writes log.process<i>.txt.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.abc
import logging
import os
import re
import shlex
import sys
import tempfile
import time

from absl import flags
from absl import logging as absl_logging
from tqdm.auto import tqdm

from ddpm_jax import fileio

LEVELS = ("quiet", "info", "debug")
DEFAULT_LEVEL = "quiet"
FILE_NAME = "log.txt"
NATIVE_ENV = "TF_CPP_MIN_LOG_LEVEL"  # TensorFlow's and XLA's C++ logs (read once, when they load)
CONSOLE_WARNINGS_OF = ("jax",)  # the libraries whose warnings a quiet console shows: about how the program runs
MAX_PENDING = 20_000  # records kept in memory until the log file can be opened (the oldest dropped)
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../ddpm_jax
LEVEL_HELP = (
    "What the console shows besides progress, notices and results: quiet = ddpm_jax's own lines, errors "
    "and JAX's warnings (the other library lines, e.g. Orbax's at each checkpoint, go to <workdir>/log.txt "
    "only); info = every library line at INFO and up, here too; debug = DEBUG lines as well."
)


def define_flag():
    """--log_level (once per process; cli.run calls it for every command)."""
    if "log_level" not in flags.FLAGS:
        flags.DEFINE_enum("log_level", DEFAULT_LEVEL, LEVELS, LEVEL_HELP)
    return flags.FLAGS["log_level"]


def level_in_argv(argv: list[str]) -> str:
    """The --log_level given in argv (read before absl parses it, to set the C++ logs' level before
    TensorFlow loads); the default if absent. A bad value is left for absl to refuse."""
    level = DEFAULT_LEVEL
    for i, arg in enumerate(argv[1:], start=1):
        name, eq, value = arg.lstrip("-").partition("=")
        if arg.startswith("-") and name == "log_level":
            level = value if eq else (argv[i + 1] if i + 1 < len(argv) else level)
    return level


def quiet_native_logs(level: str, environ=os.environ) -> None:
    """TF_CPP_MIN_LOG_LEVEL=1 in quiet mode, unless set: TensorFlow and XLA then print no C++ INFO
    lines. Must run before they load (cli.run calls it first)."""
    if level == "quiet":
        environ.setdefault(NATIVE_ENV, "1")


_NATIVE_PREFIX = re.compile(r"^([IWEF])\d{4} ")  # absl's C++ prefix: I0000 00:00:1796525158.521933 ...
_NATIVE_LEVELS = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}


def log_native_lines(text: str, logger_name: str) -> None:
    """Logs what C++ code wrote to stderr, one record per line: at the level of its absl prefix
    (a line without one, such as the rest of a message, at its previous line's; INFO at first)."""
    logger, level = logging.getLogger(logger_name), logging.INFO
    for line in text.splitlines():
        m = _NATIVE_PREFIX.match(line)
        if m:
            level = _NATIVE_LEVELS[m.group(1)]
        if line.strip():
            logger.log(level, "%s", line, extra={"native": True})  # written as it is


@contextlib.contextmanager
def native_stderr_to_log(logger_name: str):
    """Inside the block, what anything writes to file descriptor 2 (C++ code included) goes to a
    temporary file; at its end, to the log (log_native_lines)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as captured:
            os.dup2(captured.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                captured.seek(0)
                log_native_lines(captured.read().decode("utf-8", errors="replace"), logger_name)
    finally:
        os.close(saved)


class _QuietImport(importlib.abc.MetaPathFinder):
    """Imports `tensorflow` (its top-level package, when something first imports it) inside
    native_stderr_to_log: its C++ lines at import go to the log, not the console."""

    NAMES = ("tensorflow",)

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.NAMES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _QuietLoader(spec.loader)
                return spec
        return None


class _QuietLoader(importlib.abc.Loader):
    """The module's own loader, with exec_module inside native_stderr_to_log; the module keeps its loader."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self.loader
        with native_stderr_to_log(f"{module.__name__}.cpp"):
            self.loader.exec_module(module)


def is_ours(record: logging.LogRecord) -> bool:
    """A record of ddpm_jax's own code (through logging.getLogger(__name__), the root logger or absl's)."""
    if record.name == "ddpm_jax" or record.name.startswith("ddpm_jax."):
        return True
    if record.name not in ("root", "absl"):  # a library's own logger (tensorflow.cpp, jax._src...)
        return False
    return os.path.abspath(record.pathname).startswith(_PACKAGE_DIR + os.sep)  # logging.warning, absl's


class _AbslFormatter(absl_logging.PythonFormatter):
    """absl's format (I1206 02:46:01.988790 139934491200384 file.py:849] message); a C++ line, which
    has its own prefix already, as it is."""

    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage() if getattr(record, "native", False) else super().format(record)


class _ShortFormatter(logging.Formatter):
    """`warning: message` for ddpm_jax's records (its INFO lines bare); `warning (logger): message` for a
    library's (the module for absl's and the root logger's)."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        level = record.levelname.lower()
        if is_ours(record):
            return text if record.levelno < logging.WARNING else f"{level}: {text}"
        source = record.module if record.name in ("absl", "root") else record.name  # Orbax logs through absl
        return f"{level} ({source}): {text}"


class _Console(logging.Handler):
    """The console's share of the records, on stderr through tqdm.write (above a progress bar)."""

    def __init__(self, level: str):
        super().__init__()
        self.everything = level != "quiet"
        self.main_process = True
        self.setFormatter(_AbslFormatter() if self.everything else _ShortFormatter())

    def shows(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        if not self.main_process:
            return False
        if self.everything:
            return True
        if is_ours(record):
            return record.levelno >= logging.INFO
        return record.levelno >= logging.WARNING and record.name.split(".")[0] in CONSOLE_WARNINGS_OF

    def emit(self, record: logging.LogRecord) -> None:
        if not self.shows(record):
            return
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging's own convention: report, never raise
            self.handleError(record)


class _WorkdirLog(logging.Handler):
    """Every record, in absl's format, to the workdir's log file once `attach`ed and the workdir exists
    (before that, in memory). Locally the file itself is appended to; for a remote workdir a local
    temporary file, copied to the workdir by close()."""

    def __init__(self):
        super().__init__()
        self.setFormatter(_AbslFormatter())
        self.pending: collections.deque[str] = collections.deque(maxlen=MAX_PENDING)
        self.target = None  # epath of <workdir>/log.txt
        self.local: str | None = None  # the file written: the target itself, or a local temporary file
        self.stream = None
        self.failed = False
        self.notice = ""  # printed (by process 0) when the file opens: where the log goes

    @property
    def remote(self) -> bool:
        return self.target is not None and not fileio.is_local(self.target)

    def attach(self, workdir, name: str, hint: str | None = None) -> None:
        """Writes to <workdir>/<name> from now on (once the workdir exists); with a hint, prints
        `Library logs: <where><hint>` when the file opens."""
        self.target = fileio.as_path(workdir) / name
        if self.remote:
            fd, self.local = tempfile.mkstemp(prefix="ddpm_jax_log_", suffix=".txt")
            os.close(fd)
        else:
            self.local = os.fspath(self.target)
        if hint is not None:
            self.notice = f"Library logs: {self.where()}{hint}"
        self.acquire()
        try:
            self._open_if_ready()
        finally:
            self.release()

    def _open_if_ready(self) -> None:
        if self.stream is not None or self.local is None or self.failed:
            return
        if not os.path.isdir(os.path.dirname(self.local)):  # the train loop makes the workdir
            return
        try:
            self.stream = open(self.local, "a", encoding="utf-8")
            header = f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: {shlex.join(sys.argv)}"
            self.stream.write("\n".join([header, *self.pending]) + "\n")
            self.stream.flush()
            if self.notice:
                print(self.notice, flush=True)
        except OSError as e:
            self._fail(e)
        self.pending.clear()

    def _fail(self, e: OSError) -> None:
        stream, self.failed, self.stream = self.stream, True, None
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass
        print(f"warning: cannot write {self.local} ({e}); library logs are not kept.", file=sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        if self.failed:
            return
        try:
            text = self.format(record)
            if self.stream is None:
                self.pending.append(text)
                self._open_if_ready()
            else:
                self.stream.write(text + "\n")
                self.stream.flush()
        except OSError as e:  # a full disk, the workdir removed
            self._fail(e)
        except Exception:  # noqa: BLE001 - logging's own convention: report, never raise
            self.handleError(record)

    def where(self) -> str:
        """Where the log goes, for the notice."""
        if self.remote:
            return f"{self.local} (copied to {os.fspath(self.target)} when the command ends)"
        return os.fspath(self.target)

    def close(self) -> None:
        self.acquire()
        try:
            opened = self.stream is not None
            if opened:
                self.stream.close()
                self.stream = None
            if self.remote and opened and not self.failed:
                self._upload()
        finally:
            self.release()
            super().close()

    def _upload(self) -> None:
        """Appends the local file to the remote log.txt (one whole write: object stores cannot append)."""
        try:
            if not self.target.parent.exists():  # the run stopped before making its workdir
                os.remove(self.local)
                return
            with open(self.local, encoding="utf-8") as f:
                text = f.read()
            fileio.atomic_write(self.target, (fileio.read_text(self.target) or "") + text)
            os.remove(self.local)
        except Exception as e:  # noqa: BLE001 - the run itself is done; say where the log is
            print(
                f"warning: could not copy the log to {os.fspath(self.target)} ({type(e).__name__}: {e}); "
                f"it is in {self.local}.",
                file=sys.stderr,
            )


class _Setup:
    def __init__(self, level: str):
        root = logging.getLogger()
        self.level = level
        self.saved_handlers, self.saved_level = list(root.handlers), root.level
        self.console, self.file = _Console(level), _WorkdirLog()
        absl_handler = absl_logging.get_absl_handler()
        if absl_handler in root.handlers:  # ours replace it: its lines would break the bar, and go nowhere else
            root.removeHandler(absl_handler)
        root.addHandler(self.console)
        root.addHandler(self.file)
        if level == "debug":
            root.setLevel(logging.DEBUG)
        elif root.getEffectiveLevel() > logging.INFO and not _verbosity_given():
            root.setLevel(logging.INFO)  # the file keeps INFO lines (app.run sets INFO too, unless -v says)
        self.quiet_import = _QuietImport() if level == "quiet" and "tensorflow" not in sys.modules else None
        if self.quiet_import is not None:
            sys.meta_path.insert(0, self.quiet_import)

    def stop(self) -> None:
        root = logging.getLogger()
        if self.quiet_import in sys.meta_path:
            sys.meta_path.remove(self.quiet_import)
        for handler in (self.console, self.file):
            root.removeHandler(handler)
        self.file.close()
        # The handlers as they were, in their order, then any added since (a test's capture).
        added = [h for h in root.handlers if h not in self.saved_handlers]
        root.handlers[:] = self.saved_handlers + added
        root.setLevel(self.saved_level)


def _verbosity_given() -> bool:
    return "verbosity" in flags.FLAGS and flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].present > 0


_setup: _Setup | None = None


def start(level: str = DEFAULT_LEVEL) -> None:
    """Routes log records: the console's share to stderr, all of them to the workdir's log once
    `to_workdir` names it. Undone by stop()."""
    global _setup
    if level not in LEVELS:
        raise ValueError(f"--log_level={level!r} must be one of {', '.join(LEVELS)}.")
    stop()
    _setup = _Setup(level)


def stop() -> None:
    """Closes the log file (copies a remote workdir's) and gives logging back its handlers."""
    global _setup
    if _setup is not None:
        setup, _setup = _setup, None
        setup.stop()


def to_workdir(workdir, process_index: int = 0) -> None:
    """Sends every log record to <workdir>/log.txt (log.process<i>.txt for process i > 0), from the
    start of the process, once the workdir exists; process 0 then prints one line that says where
    (`Library logs: <path>`), and only process 0 shows anything below ERROR. Does nothing unless
    start() was called (the loop run in-process, from a notebook or a test, keeps logging as it is)."""
    if _setup is None:
        return
    _setup.console.main_process = process_index == 0
    if process_index == 0:
        hint = " (--log_level=info shows them here too)." if _setup.level == "quiet" else "."
        _setup.file.attach(workdir, FILE_NAME, hint)
    else:
        _setup.file.attach(workdir, f"log.process{process_index}.txt")
