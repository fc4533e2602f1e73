"""Rich progress bars for the long stages, or nothing at all with --quiet."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class Stages:
    """One bar per stage and shape; ``stage(...)`` yields the callback that advances it."""

    def __init__(self, progress: Progress | None) -> None:
        self._progress = progress

    @contextlib.contextmanager
    def stage(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        if self._progress is None:
            yield lambda advance=1: None
            return
        task = self._progress.add_task(description, total=max(total, 1))
        yield lambda advance=1: self._progress.advance(task, advance)
        self._progress.update(task, completed=max(total, 1))


@contextlib.contextmanager
def stages(quiet: bool, console: Console | None = None) -> Iterator[Stages]:
    if quiet:
        yield Stages(None)
        return
    columns = (
        TextColumn("{task.description:<42}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console or Console(stderr=True), transient=False) as progress:
        yield Stages(progress)
