"""ROOT(ns_form=...) and a table entry's optional "form": which Newton–Schulz form each shape runs."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import MUON
from torch import nn

from root_core import ROOT, CoefficientTable, optimizer
from root_core.tables import TableError

pytestmark = pytest.mark.filterwarnings("ignore::root_core.tables.MissingShapeWarning")

MUON_ROW = MUON.rows[0]
WIDE, SQUARE = (24, 80), (32, 32)


def table_with_forms(wide_form: str | None) -> CoefficientTable:
    wide = {"coefficients": [MUON_ROW], **({"form": wide_form} if wide_form else {})}
    return CoefficientTable.create(
        name="forms", default_rows=MUON_ROW, entries={WIDE: wide, SQUARE: [MUON_ROW]}
    )


def forms_used(monkeypatch, root: ROOT, params) -> dict[tuple[int, int], str]:
    """Step once and record the form each matrix shape was orthogonalised with."""
    seen: dict[tuple[int, int], str] = {}
    real = optimizer.orthogonalize

    def spy(G, schedule, **kwargs):
        seen[tuple(G.shape[-2:])] = kwargs.get("form", "standard")
        return real(G, schedule, **kwargs)

    monkeypatch.setattr(optimizer, "orthogonalize", spy)
    generator = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    root.step()
    return seen


def make_params(*shapes):
    generator = torch.Generator().manual_seed(1)
    return [nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]


@pytest.mark.parametrize(
    ("ns_form", "wide_form", "expected"),
    [
        (None, None, {WIDE: "standard", SQUARE: "standard"}),  # tables without "form": today's iteration
        (None, "gram", {WIDE: "gram", SQUARE: "standard"}),  # the entry decides, per shape
        ("standard", "gram", {WIDE: "standard", SQUARE: "standard"}),  # an explicit ns_form wins
        ("gram", None, {WIDE: "gram", SQUARE: "gram"}),
    ],
)
def test_each_shape_runs_the_form_chosen_for_it(monkeypatch, ns_form, wide_form, expected):
    params = make_params(WIDE, SQUARE)
    root = ROOT(params, table=table_with_forms(wide_form), ns_form=ns_form, ns_dtype=torch.float64)
    assert forms_used(monkeypatch, root, params) == expected


def test_gram_and_standard_updates_agree_in_float64():
    """Same rows, same polynomial: the parameters move the same way up to float64 round-off."""
    runs = {}
    for form in ("standard", "gram"):
        params = make_params(WIDE, (80, 24), SQUARE)
        root = ROOT(params, lr=0.02, table="polar-express", ns_form=form, ns_dtype=torch.float64)
        generator = torch.Generator().manual_seed(2)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            root.step()
        runs[form] = [p.detach().clone() for p in params]
    for standard, gram in zip(runs["standard"], runs["gram"], strict=True):
        torch.testing.assert_close(gram, standard, rtol=1e-12, atol=1e-12)


def test_a_checkpoint_without_ns_form_loads_and_steps():
    params = make_params(WIDE)
    root = ROOT(params, ns_dtype=torch.float64)
    state = root.state_dict()
    for group in state["param_groups"]:
        del group["ns_form"]  # as saved before ns_form existed
    fresh = ROOT(params, ns_dtype=torch.float64)
    fresh.load_state_dict(state)
    params[0].grad = torch.ones(WIDE, dtype=params[0].dtype)
    fresh.step()


def test_bad_ns_form_is_named_in_the_error():
    message = "ns_form must be one of (None, 'standard', 'gram'), got 'fast'"
    with pytest.raises(ValueError, match=re.escape(message)):
        ROOT(make_params(WIDE), ns_form="fast")


def test_table_entry_form_round_trips_and_is_part_of_the_coefficients_hash():
    gram, plain = table_with_forms("gram"), table_with_forms(None)
    assert gram.entry(WIDE).form == "gram" and plain.entry(WIDE).form is None
    assert CoefficientTable.from_dict(gram.to_dict()) == gram
    assert "form" not in plain.to_dict()["entries"][0]  # old tables keep their bytes and hashes
    assert gram.coefficients_hash != plain.coefficients_hash
    assert gram.rows_differing_from(plain) == [f"{WIDE[0]}x{WIDE[1]}"]


def test_unknown_entry_form_is_named_in_the_error():
    data = table_with_forms("gram").to_dict()
    data.pop("content_hash")
    data["entries"][0]["form"] = "fast"
    message = "<dict>: entries[0].form: expected 'standard' or 'gram', got 'fast'"
    with pytest.raises(TableError, match=re.escape(message)):
        CoefficientTable.from_dict(data)


def test_the_step_reads_forms_and_rows_resolved_at_construction(monkeypatch):
    """Table lookups happen when the parameters are added, not in the (compiled) step."""
    params = make_params(WIDE, SQUARE)
    root = ROOT(params, table=table_with_forms("gram"), ns_dtype=torch.float64)

    def no_lookup(*args, **kwargs):
        raise AssertionError("the table was consulted inside step()")

    monkeypatch.setattr(CoefficientTable, "entry", no_lookup)
    monkeypatch.setattr(CoefficientTable, "schedule_for", no_lookup)
    assert forms_used(monkeypatch, root, params) == {WIDE: "gram", SQUARE: "standard"}
