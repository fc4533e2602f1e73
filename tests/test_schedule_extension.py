"""Running a schedule past the steps its rows were fitted for stays inside the safety bound."""

from __future__ import annotations

import math

import pytest
import torch

from root_core import load_table, orthogonalize
from root_core.optimizer import FRAGILE_GAIN
from root_core.schedule import CONVERGENT_ROW, Schedule
from root_core.spectral import ROUNDING_MARGIN, composition_range
from root_core.tables import available_tables

EXTENDED_STEPS = 10  # the precision plots' 1–10 curve, and a user's ns_steps=10


def bundled_schedules():
    for name, versions in available_tables().items():
        for version in versions:
            table = load_table(f"{name}@{version}")
            yield f"{name}@{version}:default", table.default_schedule
            for entry in table.entries:
                yield f"{name}@{version}:{entry.shape[0]}x{entry.shape[1]}", table.schedule_for(entry.shape)


@pytest.mark.parametrize(
    ("label", "schedule"), list(bundled_schedules()), ids=lambda x: x if isinstance(x, str) else ""
)
def test_running_past_the_fitted_steps_keeps_the_bound(label, schedule):
    fitted = composition_range(schedule, margin=ROUNDING_MARGIN)[1]
    if fitted > FRAGILE_GAIN:
        pytest.skip(f"{label} is fragile within its own steps (P up to {fitted:.3g}); ROOT warns")
    extended = composition_range(schedule, EXTENDED_STEPS, margin=ROUNDING_MARGIN)[1]
    # Never beyond what the fitted steps reach (at least 1), plus one rounding margin: repeating the
    # llama-3.2-1b-shared v2 rows instead reached 9e273 here.
    assert extended <= max(1.0, fitted) * (1 + ROUNDING_MARGIN), (label, fitted, extended)


def test_the_convergent_row_only_moves_sigma_towards_1():
    a, b, c = CONVERGENT_ROW
    sigma = torch.linspace(0.0, math.sqrt(7 / 3), 100_001, dtype=torch.float64)
    p = sigma * (a + sigma**2 * (b + c * sigma**2))
    assert torch.all((p - 1).abs() <= (sigma - 1).abs() + 1e-15)
    assert composition_range(Schedule(rows=(CONVERGENT_ROW,), steps=3), margin=0.0) == (0.0, 1.0)


def test_published_sets_still_repeat_their_last_row():
    # torch.optim.Muon with ns_steps=6 repeats its row: ROOT must too (tests/test_muon_compat.py).
    muon = load_table("muon").default_schedule
    assert muon.expanded(7) == muon.rows * 7
    polar = load_table("polar-express").default_schedule
    assert polar.expanded(7)[5:] == (polar.rows[-1],) * 2
    # A calibrated shared row that blows up when repeated (under the margin) continues with the classic row.
    shared = load_table("llama-3.2-1b-shared@2").schedule_for((2048, 2048))
    assert shared.expanded(EXTENDED_STEPS)[5:] == (CONVERGENT_ROW,) * 5
    assert shared.with_steps(EXTENDED_STEPS).rows == shared.expanded(EXTENDED_STEPS)  # ROOT's ns_steps path


def test_a_calibrated_table_run_for_10_steps_converges_in_bf16():
    schedule = load_table("qwen2.5-0.5b-shared@2").schedule_for((128, 896))
    generator = torch.Generator().manual_seed(0)
    # Nearly rank one, so the normalised top σ sits at 1, where the fitted row repeated settles at 0.96
    # (top σ of the result 1.076 in bf16 when the row was repeated).
    G = torch.randn(128, 1, generator=generator) @ torch.randn(1, 896, generator=generator)
    G += 1e-3 * torch.randn(128, 896, generator=generator)
    top = torch.linalg.matrix_norm(orthogonalize(G, schedule, steps=EXTENDED_STEPS).float(), ord=2)
    bf16 = torch.linalg.matrix_norm(
        orthogonalize(G, schedule, steps=EXTENDED_STEPS, dtype=torch.bfloat16).float(), ord=2
    )
    # float32: 1 up to round-off; bf16: 8 significant bits, a few roundings per step: 1% (measured 0.06%).
    assert abs(top.item() - 1) < 1e-5 and abs(bf16.item() - 1) < 0.01
