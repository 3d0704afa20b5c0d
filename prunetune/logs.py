"""Library log lines and warnings (Ray's token notice, MLflow's migrations, Optuna's experimental
warnings, a dead worker's long report) stay out of normal output: they go to a log file, and to
stderr as well with `--verbose`. prunetune prints its own lines (progress, results, one-line
errors) with `click.echo`, not through logging.

Records are buffered until the command knows where its log belongs (a sweep: beside its state,
once its checks passed, so bad input writes nothing); `close()` without a file drops them.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from pathlib import Path

# Loggers that libraries configure with their own stderr handlers; theirs are removed so their
# records reach ours.
LIBRARY_LOGGERS = ("ray", "ray.tune", "ray.train", "ray.data", "ray.air", "mlflow", "optuna", "alembic",
                   "urllib3", "filelock", "torch_pruning")
_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


class LogCapture:
    def __init__(self, verbose: bool = False):
        # MLflow configures its loggers at import unless told not to; Optuna at first use.
        os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
        self.verbose = verbose
        self.path: Path | None = None
        self.buffer = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
        self.handlers: list[logging.Handler] = [self.buffer]
        if verbose:
            stream = logging.StreamHandler(sys.stderr)
            stream.setFormatter(logging.Formatter(_FORMAT))
            self.handlers.append(stream)
        root = logging.getLogger()
        self._saved = (root.handlers[:], root.level)
        root.handlers = list(self.handlers)
        root.setLevel(logging.INFO)
        logging.captureWarnings(True)
        self.counter = _Counter()
        root.addHandler(self.counter)
        self.adopt()

    @property
    def warnings(self) -> int:
        """How many warnings (and errors) the libraries logged."""
        return self.counter.count

    def adopt(self) -> None:
        """Route the libraries' loggers to ours (call again after importing or starting one:
        Ray and Optuna install their handlers then)."""
        for name in LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            logger.handlers = []
            logger.propagate = True
        if "optuna" in sys.modules:
            import optuna

            optuna.logging.disable_default_handler()
            optuna.logging.enable_propagation()

    def to_file(self, path: Path) -> Path:
        """Write what was buffered, and everything from now on, to `path`."""
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter(_FORMAT))
        self.buffer.setTarget(handler)
        self.buffer.flush()
        root = logging.getLogger()
        root.removeHandler(self.buffer)
        root.addHandler(handler)
        self.buffer = handler
        self.path = path
        return path

    def close(self, default: Path | None = None) -> None:
        """Stop capturing; records still buffered go to `default` (if given and there are any)."""
        if self.path is None and default is not None and isinstance(self.buffer, logging.handlers.MemoryHandler) \
                and self.buffer.buffer:
            self.to_file(default)
        root = logging.getLogger()
        for handler in root.handlers:
            handler.flush()
            if isinstance(handler, logging.FileHandler):
                handler.close()
        logging.captureWarnings(False)
        root.handlers, level = self._saved
        root.setLevel(level)


class _Counter(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
