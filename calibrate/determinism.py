"""One CPU thread for the stages whose output decides the coefficients.

The guarantee: the same inputs, seed, torch build and device type give bit-identical harvested samples,
spectra and fitted coefficients, whatever the CPU load and whatever ``torch.set_num_threads`` (or
OMP_NUM_THREADS) the caller chose. Multi-threaded kernels split their work by the thread count, and a
floating-point sum depends on how it is split: measured on the reference 2-core machine, ``eigvalsh`` of
a 512×1376 sample's Gram gave spectra 2.3e-16 apart at 1 and at 2 threads, and a calibration from the
same config once harvested momentum 2e-6 apart from the run before. The fit amplifies such differences
into different coefficients. So the harvest, the spectra and the fit run on one thread, and restore the
caller's thread count after.

What this does not cover: on CUDA the harvest's backward pass uses atomic adds (embedding, scatter), so a
GPU harvest is reproducible only up to those; the matrix check (validation metrics, not coefficients)
keeps every thread.

The cost, measured on the reference 2-core machine while other jobs loaded it (load average 5–9), one
thread against two: a 6-step harvest at 1024×4096 took 18 s against 42 s, a 2048×5504 spectrum 4.4 s
against 10.1 s, and eigvalsh of a 4096×4096 Gram 10 s against 28 s (a float64 4096×11008 Gram product
took 21 s either way, bit-identical). On an idle machine two threads would be faster than one for the
matrix products, by at most 2× on two cores; that was not measured.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

import torch

# One thread: the only count every machine has, so results agree across machines with any core count.
DETERMINISTIC_THREADS = 1

P = ParamSpec("P")
R = TypeVar("R")


@contextlib.contextmanager
def pinned_threads(threads: int = DETERMINISTIC_THREADS) -> Iterator[None]:
    """Run the block with ``threads`` torch CPU threads; the caller's count is restored on exit."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def deterministic(function: Callable[P, R]) -> Callable[P, R]:
    """``function`` run under :func:`pinned_threads`."""

    @functools.wraps(function)
    def pinned(*args: P.args, **kwargs: P.kwargs) -> R:
        with pinned_threads():
            return function(*args, **kwargs)

    return pinned
