"""Where every benchmark's report goes: stdout, and with --record the end of RESULTS.md."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def publish(report: str, record: bool) -> None:
    print(report, flush=True)
    if record:
        with RESULTS.open("a") as out:
            out.write("\n" + report)
