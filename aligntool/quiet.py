"""Keep other libraries' start-up chatter out of aligntool's own messages.

A user who mistypes a recipe key should see aligntool's one-line answer first and alone. Two things printed before it:

* bitsandbytes (installed with the ``bitsandbytes`` extra) tries, on import, to fetch a CPU kernel from the hub
  through the ``kernels`` package and logs one or two warnings when it cannot ("Failed to load CPU gemm_4bit_forward
  from kernels-community ...", "Skipping publisher trust check ... offline mode"). TRL and peft import it, so every
  command that loads them printed those lines. :func:`install` quiets the ``bitsandbytes`` and ``kernels`` loggers
  (below ERROR) while bitsandbytes is being imported, and only then: whichever of aligntool's imports pulls it in,
  and nothing those libraries log later (during training) is hidden.
* datasets draws a progress bar for every file it reads and every ``map``/``filter``; :func:`no_progress_bars`
  turns datasets' bars off around aligntool's own data loading and checks, and restores the previous setting.

Only the command line installs these (``aligntool.cli.main``); a program that imports aligntool keeps every log.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.util
import logging
import sys

# module imported -> loggers quieted while it is being imported
NOISY_IMPORTS: dict[str, tuple[str, ...]] = {"bitsandbytes": ("bitsandbytes", "kernels")}


@contextlib.contextmanager
def loggers_at(level: int, names: tuple[str, ...]):
    """Raise the named loggers (and their children that keep the default level) to ``level``; restore after."""
    saved = [(logger, logger.level) for logger in map(logging.getLogger, names)]
    for logger, old in saved:
        logger.setLevel(max(level, old))
    try:
        yield
    finally:
        for logger, old in saved:
            logger.setLevel(old)


class _QuietLoader(importlib.abc.Loader):
    """The module's own loader, with its ``exec_module`` (the import itself) run under :func:`loggers_at`."""

    def __init__(self, loader, loggers: tuple[str, ...]):
        self._loader = loader
        self._loggers = loggers

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = self._loader  # the module keeps its real loader (resources, inspect, pickle)
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        with loggers_at(logging.ERROR, self._loggers):
            self._loader.exec_module(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _QuietImports(importlib.abc.MetaPathFinder):
    """Finds the modules of :data:`NOISY_IMPORTS` as the other finders do and wraps their loader."""

    def __init__(self):
        self._finding: set[str] = set()

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in NOISY_IMPORTS or fullname in self._finding:
            return None
        self._finding.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)  # the real spec: this finder answers None while it looks
        except (ImportError, ValueError):
            return None
        finally:
            self._finding.discard(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _QuietLoader(spec.loader, NOISY_IMPORTS[fullname])
        return spec


def install() -> None:
    """Quiet the import-time logging of :data:`NOISY_IMPORTS` for this process (once; a no-op if already imported)."""
    if not any(isinstance(finder, _QuietImports) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietImports())


@contextlib.contextmanager
def no_progress_bars():
    """datasets' progress bars off inside the block, the previous setting back after (a user's
    ``HF_DATASETS_DISABLE_PROGRESS_BARS`` wins, as in datasets)."""
    import datasets
    from datasets import config
    from datasets.utils import are_progress_bars_disabled

    if config.HF_DATASETS_DISABLE_PROGRESS_BARS is not None:  # the user's explicit choice
        yield
        return
    was_disabled = are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def without_progress_bars(fn):
    """Decorator form of :func:`no_progress_bars`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with no_progress_bars():
            return fn(*args, **kwargs)

    return wrapper
