"""A resumed ROOT checks the table's numbers, not its file: coefficients_hash in every param group."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from root_core import ROOT, CoefficientTable, load_table
from root_core.optimizer import GROUP_TABLE_HASH_KEY, GROUP_TABLE_KEY, LEGACY_STATE_TABLE_KEY

pytestmark = [
    pytest.mark.filterwarnings("ignore::root_core.tables.MissingShapeWarning"),
    # Made-up rows, fragile under rounding; these tests run float32 on the CPU and check identity only.
    pytest.mark.filterwarnings("ignore::root_core.optimizer.FragileScheduleWarning"),
]

MUON = (3.4445, -4.7750, 2.0315)
ROWS = {(16, 24): [(3.0, -4.0, 2.0)], (24, 32): [(2.0, -1.5, 0.5), (1.5, -0.5, 0.0)]}


def calibrated(provenance: dict, rows=ROWS, default=MUON, version=1) -> CoefficientTable:
    entries = {
        shape: {"coefficients": r, "metrics": {"seconds": len(provenance)}} for shape, r in rows.items()
    }
    return CoefficientTable.create(
        name="mine", version=version, default_rows=default, entries=entries, provenance=provenance
    )


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 16, bias=False), nn.Linear(16, 24, bias=False))


def trained(table, steps=2) -> tuple[nn.Module, ROOT]:
    net = model()
    optimizer = ROOT(net.parameters(), lr=0.01, table=table)
    for _ in range(steps):
        net(torch.randn(4, 24)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return net, optimizer


def test_coefficients_hash_names_the_numbers_only():
    a = calibrated({"device": "cpu", "command": "root-calibrate --shapes 16x24"})
    b = calibrated({"device": "cuda", "command": "something else", "seconds": 3})
    assert a.content_hash != b.content_hash  # the files differ ...
    assert a.coefficients_hash == b.coefficients_hash  # ... the numbers do not
    assert a.ref["coefficients_hash"] == a.coefficients_hash
    other_eps = CoefficientTable.create(name="mine", default_rows=MUON, eps=1e-6)
    assert (
        other_eps.coefficients_hash
        != CoefficientTable.create(name="mine", default_rows=MUON).coefficients_hash
    )


def test_rows_differing_from_names_shapes_and_default():
    base = calibrated({})
    changed = calibrated({}, rows={(16, 24): [(3.0, -4.0, 2.1)], (8, 8): [MUON]}, default=(3.0, -4.0, 2.0))
    assert base.rows_differing_from(changed) == ["default rows", "8x8", "16x24", "24x32"]
    assert base.rows_differing_from(calibrated({"x": 1})) == []


def test_state_resumes_under_a_table_with_the_same_numbers_and_other_provenance():
    _, optimizer = trained(calibrated({"device": "cpu"}))
    net = model()
    resumed = ROOT(net.parameters(), lr=0.01, table=calibrated({"device": "cuda", "seconds": 12.5}))
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert resumed.state_dict()["param_groups"][0][GROUP_TABLE_HASH_KEY] == optimizer.table.coefficients_hash


def test_mismatch_names_the_rows_that_differ(tmp_path, monkeypatch):
    from root_core.tables import TABLES_ENV, save_table

    v1 = calibrated({})
    v2 = calibrated({}, rows={**ROWS, (16, 24): [(3.0, -4.0, 2.1)]}, default=(3.0, -4.0, 2.0), version=2)
    save_table(v1, tmp_path)
    monkeypatch.setenv(TABLES_ENV, str(tmp_path))
    _, optimizer = trained("mine@1")
    fresh = ROOT(model().parameters(), table=v2)
    message = (
        f"optimizer state was saved with table 'mine@1' ({v1.coefficients_hash[:15]}…), but this ROOT uses "
        f"'mine@2' ({v2.coefficients_hash[:15]}…): rows differ for default rows, 16x24; "
        'construct ROOT with table="mine@1" to resume it'
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        fresh.load_state_dict(optimizer.state_dict())
    monkeypatch.setenv(TABLES_ENV, str(tmp_path / "elsewhere"))  # the saved table cannot be found
    with pytest.raises(
        ValueError, match=re.escape("the coefficients differ (no 'mine@1' with those numbers")
    ):
        fresh.load_state_dict(optimizer.state_dict())


def test_dcp_state_dict_keeps_the_check_and_resumes():
    net, optimizer = trained("root-paper")
    saved = get_optimizer_state_dict(net, optimizer)
    assert set(saved) == {"state", "param_groups"}  # DCP drops any other top-level key ...
    assert saved["param_groups"][0][GROUP_TABLE_KEY] == "root-paper@1"  # ... but keeps the groups'
    other = model()
    with pytest.raises(ValueError, match=re.escape("saved with table 'root-paper@1'")):
        set_optimizer_state_dict(other, ROOT(other.parameters(), table="muon"), copy.deepcopy(saved))
    # The same table resumes: the next step matches the original optimizer's.
    other.load_state_dict(net.state_dict())
    resumed = ROOT(other.parameters(), lr=0.01, table="root-paper")
    set_optimizer_state_dict(other, resumed, copy.deepcopy(saved))
    gradient = torch.randn(4, 24)
    for network, opt in ((net, optimizer), (other, resumed)):
        network(gradient).square().sum().backward()
        opt.step()
    for a, b in zip(net.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)


def test_old_checkpoints_still_load_and_are_still_checked():
    _, optimizer = trained("root-paper")
    state = optimizer.state_dict()
    for group in state["param_groups"]:  # written before the identity moved into the groups
        del group[GROUP_TABLE_KEY], group[GROUP_TABLE_HASH_KEY]
    paper = load_table("root-paper")
    legacy = {
        **copy.deepcopy(state),
        LEGACY_STATE_TABLE_KEY: {k: v for k, v in paper.ref.items() if k != "coefficients_hash"},
    }
    fresh = ROOT(model().parameters(), table="root-paper")
    fresh.load_state_dict(copy.deepcopy(legacy))
    assert fresh.param_groups[0][GROUP_TABLE_HASH_KEY] == paper.coefficients_hash  # backfilled
    fresh.load_state_dict(copy.deepcopy(state))  # no identity at all: nothing to check
    with pytest.raises(ValueError, match=re.escape("saved with table 'root-paper@1'")):
        ROOT(model().parameters(), table="muon").load_state_dict(copy.deepcopy(legacy))


@pytest.mark.filterwarnings("ignore:.*process group.*:UserWarning")
def test_dcp_save_and_load_on_disk_carry_the_table(tmp_path):
    import torch.distributed.checkpoint as dcp

    net, optimizer = trained("root-paper")
    dcp.save(get_optimizer_state_dict(net, optimizer), checkpoint_id=tmp_path / "ckpt")
    other = model()
    muon = ROOT(other.parameters(), table="muon")
    layout = get_optimizer_state_dict(other, muon)
    dcp.load(layout, checkpoint_id=tmp_path / "ckpt")
    assert layout["param_groups"][0][GROUP_TABLE_KEY] == "root-paper@1"
    with pytest.raises(ValueError, match=re.escape("rows differ for 2048x2048, 2048x3072")):
        set_optimizer_state_dict(other, muon, layout)


def test_checkpoints_from_before_the_baselines_notes_moved_still_resume():
    """muon/polar-express/root-paper@1 changed only their provenance note (the citation now points at
    docs/design.md); a pre-coefficients_hash checkpoint carries the old content hash and must resume."""
    _, optimizer = trained("root-paper")
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        del group[GROUP_TABLE_KEY], group[GROUP_TABLE_HASH_KEY]
    before_note_change = "sha256:b0accf50936696ffd9f090e1e52419c9cc83e2d5ceedb187cfdea47e139d409b"
    legacy = {
        **copy.deepcopy(state),
        LEGACY_STATE_TABLE_KEY: {"name": "root-paper", "version": 1, "content_hash": before_note_change},
    }
    ROOT(model().parameters(), table="root-paper").load_state_dict(copy.deepcopy(legacy))
    with pytest.raises(ValueError, match=re.escape("rows differ for 2048x2048")):
        ROOT(model().parameters(), table="muon").load_state_dict(copy.deepcopy(legacy))
