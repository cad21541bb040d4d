"""What the project prints: one progress bar per phase, everything else at warning level unless verbose.

The default (quiet) log of a long command is a few lines per phase: each phase (data, training,
evaluation, capture, reports) shows one bar with its counts and the time left (``phase``), and libraries
speak only at warning level: Python logging below WARNING is disabled, lmms-eval's loguru logger is set
to WARNING, the per-call bars of transformers / datasets / the Trainer are off, deprecation warnings of
libraries are hidden, and what lmms-eval's aggregation functions print (MMBench's category tables) is
dropped. ``--verbose`` (or ``STGC_VERBOSE=1``) shows all of it as the libraries print it.

The verbosity travels in the environment, so that subprocesses (notebook kernels, DeepSpeed ranks) follow
the command's choice. Nothing here imports torch or transformers.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any

ENV_VERBOSE = "STGC_VERBOSE"
# read at import time by huggingface_hub / transformers / datasets: set before they are imported
_QUIET_ENV = {
    # every tqdm bar that is not a phase bar (which passes disable=False): datasets' map / filter bars,
    # lmms-eval's request and postprocessing bars, ... (tqdm reads TQDM_* defaults when it is imported)
    "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "warning",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


def verbose() -> bool:
    """Whether this process (and the processes it starts) print everything the libraries print."""
    return os.environ.get(ENV_VERBOSE, "0").lower() in ("1", "true", "yes")


def configure(verbose_flag: bool | None = None) -> None:
    """Apply the verbosity to this process (the ``stgc`` command calls it first). ``None`` keeps the
    environment's choice."""
    if verbose_flag is not None:
        os.environ[ENV_VERBOSE] = "1" if verbose_flag else "0"
    if verbose():
        logging.disable(logging.NOTSET)
        logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
        return
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    # INFO and below of every Python logger (accelerate, datasets, DeepSpeed's op builder, ...)
    logging.disable(logging.INFO)
    # DeepSpeed warns on every CPU machine that it found no accelerator (its logger is "DeepSpeed")
    logging.getLogger("DeepSpeed").addFilter(_NoAcceleratorNotice())
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings(
            "ignore",
            category=category,
            module=r"(transformers|torch|lmms_eval|datasets|deepspeed|accelerate)",
        )
    for name in ("transformers", "datasets"):
        module = sys.modules.get(name)
        if module is not None:  # already imported: their env switches were read; set them directly
            _quiet_library(name)


class _NoAcceleratorNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Setting accelerator to CPU" not in record.getMessage()


def _quiet_library(name: str) -> None:
    if name == "transformers":
        from transformers.utils import logging as tlog

        tlog.set_verbosity_warning()
        tlog.disable_progress_bar()
    elif name == "datasets":
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_warning()


@contextlib.contextmanager
def quiet_output() -> Iterator[None]:
    """Around library calls that print or draw their own bars (lmms-eval, the Trainer's run, notebooks): at
    default verbosity their stdout is dropped, of their stderr only warning and error lines are passed on,
    and loguru speaks from WARNING up; phase bars (made outside) keep drawing. Verbose: unchanged."""
    if verbose():
        yield
        return
    _loguru_warning_only()
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            yield
    finally:
        # stderr held the libraries' own bars (some pass disable=False explicitly, so TQDM_DISABLE cannot
        # reach them); warnings and errors written there are passed on
        kept = [line for line in re.split(r"[\r\n]+", err.getvalue()) if _WARNING_LINE.search(line)]
        if kept:
            print("\n".join(kept), file=sys.stderr)


_WARNING_LINE = re.compile(r"warn|error|exception|traceback", re.IGNORECASE)
_LOGURU_SET = False


def _loguru_warning_only() -> None:
    """lmms-eval logs through loguru: from WARNING up, to the real stderr (set once per process)."""
    global _LOGURU_SET
    if _LOGURU_SET:
        return
    try:
        from loguru import logger
    except ImportError:
        return
    logger.remove()
    logger.add(sys.__stderr__, level="WARNING", format="{level}: {message}")
    _LOGURU_SET = True


class Phase:
    """One progress bar for one phase of a long command: counts, rate, time left (tqdm). Also usable when
    the total grows as the phase discovers its work (``add_total``)."""

    def __init__(self, name: str, total: int, unit: str = "it") -> None:
        from tqdm import tqdm

        self.name = name
        self.start = time.perf_counter()
        self.bar = tqdm(
            total=total,
            desc=f"{name:<10s}",
            unit=unit,
            dynamic_ncols=True,
            leave=True,
            file=sys.stderr,
            disable=False,  # explicit: quiet mode sets TQDM_DISABLE for every other bar
            mininterval=0.5,
            bar_format="{desc} {percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} {unit} "
            "[{elapsed}<{remaining}]{postfix}",
        )

    def update(self, n: int = 1, note: str | None = None) -> None:
        if note is not None:
            self.bar.set_postfix_str(note, refresh=False)
        self.bar.update(n)

    def note(self, text: str) -> None:
        self.bar.set_postfix_str(text)

    def add_total(self, n: int) -> None:
        self.bar.total = (self.bar.total or 0) + n
        self.bar.refresh()

    def close(self) -> None:
        self.bar.set_postfix_str("", refresh=False)
        self.bar.close()

    def __enter__(self) -> Phase:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_ACTIVE_TRAINING_PHASE: list[Phase] = []


@contextlib.contextmanager
def training_phase(phase: Phase) -> Iterator[None]:
    """While active, every transformers ``Trainer`` (also one started inside another run, e.g. the dense
    parent of an upcycled run) reports its optimizer steps to ``phase`` instead of drawing its own bar and
    printing its log dicts. It swaps transformers' ``DEFAULT_PROGRESS_CALLBACK``, the hook transformers
    itself uses to put its notebook bar in place of the terminal one."""
    import transformers.trainer as trainer_module

    previous = trainer_module.DEFAULT_PROGRESS_CALLBACK
    _ACTIVE_TRAINING_PHASE.append(phase)
    trainer_module.DEFAULT_PROGRESS_CALLBACK = _phase_callback_class()
    try:
        yield
    finally:
        trainer_module.DEFAULT_PROGRESS_CALLBACK = previous
        _ACTIVE_TRAINING_PHASE.remove(phase)


def _phase_callback_class() -> type:
    from transformers import TrainerCallback

    class PhaseProgressCallback(TrainerCallback):
        """Optimizer steps of this run -> the active training phase's bar (rank 0 only)."""

        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            self.done = state.global_step
            self.run = os.path.basename(os.path.normpath(args.output_dir))

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if state.is_world_process_zero and _ACTIVE_TRAINING_PHASE:
                _ACTIVE_TRAINING_PHASE[-1].update(state.global_step - self.done, note=self.run)
                self.done = state.global_step

    return PhaseProgressCallback
