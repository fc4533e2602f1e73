"""Recording what Newton–Schulz receives in ROOT (root_core/recording.py): spectra, files, bad inputs."""

from __future__ import annotations

import copy
import os
import re
import struct

import pytest
import torch
from conftest import SHAPES
from torch import nn

import root_core.recording as recording
from root_core import ROOT
from root_core.optimizer import momentum_update
from root_core.outliers import clip_to_quantile
from root_core.recording import (
    RECORDING_FORMAT,
    MomentumRecorder,
    RecordingError,
    read_recorded_matrices,
    read_recordings,
    singular_values,
)

# σ from the float64 Gram matrix: an eigenvalue error of ~r·1e-16·σ_max² moves σ by that over 2σ, so on
# these Gaussian inputs (σ_min ≳ 1e-3·σ_max) σ is within ~1e-12·σ_max of the SVD's; a wrong orientation,
# order or missing square root is off by ≥ 1e-2.
SPECTRUM_ATOL = 1e-10


class Net(nn.Module):
    """Two same-shape 16×16 matrices (one batch in ROOT's step), a wide and a tall one, a bias."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.mid = nn.Linear(16, 16, bias=False)
        self.mid2 = nn.Linear(16, 16, bias=False)
        self.down = nn.Linear(16, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.mid2(torch.tanh(self.mid(torch.tanh(self.up(x)))))))


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def train(model: nn.Module, optimizer: ROOT, steps: range) -> None:
    for step in steps:
        x = torch.randn(6, 8, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()


@pytest.mark.parametrize("shape", SHAPES)
def test_singular_values_match_float64_svd(shape, generator):
    B = torch.randn(*shape, generator=generator, dtype=torch.float64)
    sigma = singular_values(B)
    reference = torch.linalg.svdvals(B)
    assert sigma.dtype == torch.float64 and sigma.shape == reference.shape
    scale = reference[..., :1]
    torch.testing.assert_close(sigma / scale, reference / scale, rtol=0.0, atol=SPECTRUM_ATOL)
    assert bool((sigma[..., :-1] >= sigma[..., 1:]).all())  # descending


def test_recording_leaves_the_updates_bit_identical(tmp_path):
    recorded, plain = make_net(), make_net()
    with_recorder = ROOT(recorded.named_parameters(), lr=0.02, record_dir=tmp_path, record_every=2)
    without = ROOT(plain.parameters(), lr=0.02)
    assert without.recorder is None
    train(recorded, with_recorder, range(5))
    train(plain, without, range(5))
    for a, b in zip(recorded.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)
    assert [p.name for p in with_recorder.recorder.files] == [
        "step00000001.rank0.safetensors",
        "step00000003.rank0.safetensors",
        "step00000005.rank0.safetensors",
    ]


def test_records_the_clipped_update_that_newton_schulz_receives(tmp_path):
    model = make_net()
    optimizer = ROOT(model.named_parameters(), lr=0.02, momentum=0.9, record_dir=tmp_path)
    train(model, optimizer, range(1))
    # Step 1 from a zero buffer: the update is torch.optim.Muon's Nesterov update of the gradient.
    grad = model.mid.weight.grad
    update = momentum_update(grad, torch.zeros_like(grad), momentum=0.9, nesterov=True)
    expected = singular_values(clip_to_quantile(update, 0.9))
    spectra = {s.name: s for s in optimizer.recorder.spectra()}
    assert sorted(spectra) == ["down.weight", "mid.weight", "mid2.weight", "up.weight"]  # matrices only
    record = spectra["mid.weight"]
    assert (record.step, record.shape, record.clip_quantile, record.rank) == (1, (16, 16), 0.9, 0)
    assert record.table == "muon@1" and record.table_hash == optimizer.table.coefficients_hash
    torch.testing.assert_close(record.singular_values, expected, rtol=0.0, atol=1e-12)
    assert spectra["up.weight"].shape == (16, 8) and spectra["up.weight"].singular_values.shape == (8,)
    on_disk = {s.name: s for s in read_recordings(tmp_path)}
    assert torch.equal(on_disk["mid.weight"].singular_values, record.singular_values)
    assert on_disk["mid.weight"].file == str(tmp_path / "step00000001.rank0.safetensors")


def test_records_whole_updates_only_for_chosen_parameters(tmp_path):
    model = make_net()
    optimizer = ROOT(model.named_parameters(), lr=0.02, record_dir=tmp_path, record_matrices=["mid*"])
    train(model, optimizer, range(1))
    matrices = read_recorded_matrices(tmp_path)
    assert [m.name for m in matrices] == ["mid.weight", "mid2.weight"]
    spectra = {s.name: s for s in read_recordings(tmp_path)}
    for matrix in matrices:
        B = clip_to_quantile(matrix.update, matrix.clip_quantile)
        torch.testing.assert_close(
            singular_values(B), spectra[matrix.name].singular_values, rtol=0.0, atol=1e-12
        )


def test_unnamed_parameters_get_group_and_index_names(tmp_path):
    model = make_net()
    groups = [{"params": [model.up.weight, model.mid.weight]}, {"params": [model.down.weight]}]
    optimizer = ROOT(groups, lr=0.02, record_dir=tmp_path)
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    assert sorted(s.name for s in optimizer.recorder.spectra()) == [
        "group0.param0",
        "group0.param1",
        "group1.param0",
    ]


def test_the_real_safetensors_package_reads_a_recording(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    model = make_net()
    optimizer = ROOT(model.named_parameters(), lr=0.02, record_dir=tmp_path, record_matrices=["down.*"])
    train(model, optimizer, range(1))
    path = optimizer.recorder.files[0]
    tensors = load_file(str(path))
    assert sorted(tensors) == sorted(
        [
            "sigma:up.weight",
            "sigma:mid.weight",
            "sigma:mid2.weight",
            "sigma:down.weight",
            "update:down.weight",
        ]
    )
    assert tensors["update:down.weight"].shape == (4, 16)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == RECORDING_FORMAT and metadata["step"] == "1"
    ours = {s.name: s.singular_values for s in read_recordings(path)}
    assert all(torch.equal(tensors[f"sigma:{name}"], sigma) for name, sigma in ours.items())


def test_a_resumed_run_records_on_the_same_steps(tmp_path):
    model = make_net()
    optimizer = ROOT(model.parameters(), lr=0.02, record_dir=tmp_path / "a", record_every=3)
    train(model, optimizer, range(2))
    state = copy.deepcopy(optimizer.state_dict())
    resumed = ROOT(model.parameters(), lr=0.02, record_dir=tmp_path / "b", record_every=3)
    resumed.load_state_dict(state)
    train(model, resumed, range(2, 5))
    assert [p.name for p in resumed.recorder.files] == ["step00000004.rank0.safetensors"]
    # A ROOT without a recorder loads the same state (the recorder's key is dropped).
    ROOT(model.parameters(), lr=0.02).load_state_dict(state)


def test_a_crash_mid_write_leaves_no_file(tmp_path, monkeypatch):
    model = make_net()
    optimizer = ROOT(model.parameters(), lr=0.02, record_dir=tmp_path)
    real_write = recording.write_safetensors

    def crash_halfway(stream, tensors, metadata):
        real_write(stream, tensors[:1], metadata)  # some bytes are out, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(recording, "write_safetensors", crash_halfway)
    with pytest.raises(KeyboardInterrupt):
        train(model, optimizer, range(1))
    assert list(tmp_path.iterdir()) == []  # neither a half recording nor a temporary file


def test_a_record_dir_that_cannot_be_created_fails_at_construction(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    target = blocker / "momentum"
    message = f"record_dir '{target}' is not writable: Not a directory"
    with pytest.raises(RecordingError, match=re.escape(message)):
        ROOT([nn.Parameter(torch.ones(2, 2))], record_dir=target)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_a_read_only_record_dir_fails_at_construction(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(RecordingError, match=re.escape(f"record_dir '{tmp_path}' is not writable")):
            ROOT([nn.Parameter(torch.ones(2, 2))], record_dir=tmp_path)
    finally:
        tmp_path.chmod(0o700)


def test_bad_recorder_arguments():
    param = [nn.Parameter(torch.ones(2, 2))]
    with pytest.raises(ValueError, match=re.escape("record_every must be an integer ≥ 1, got 0")):
        ROOT(param, record_dir="unused", record_every=0)
    with pytest.raises(ValueError, match=re.escape("pass record_dir= or recorder=, not both")):
        ROOT(param, record_dir="unused", recorder=object())
    with pytest.raises(
        ValueError, match=re.escape("recorder must be a root_core.recording.MomentumRecorder")
    ):
        ROOT(param, recorder=object())


def _one_recording(tmp_path) -> os.PathLike:
    model = make_net()
    optimizer = ROOT(model.named_parameters(), lr=0.02, record_dir=tmp_path / "run")
    train(model, optimizer, range(1))
    return optimizer.recorder.files[0]


def test_a_truncated_recording_is_one_error_naming_it(tmp_path):
    path = _one_recording(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    message = f"cannot read momentum recording {path}: tensor 'sigma:down.weight' is truncated"
    with pytest.raises(RecordingError, match=re.escape(message)):
        read_recordings(tmp_path / "run")


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "shorter than a safetensors header"),
        (b"\xff" * 64, "not a safetensors file (bad header size)"),
        (struct.pack("<Q", 4) + b"{not", "its header is not JSON"),
        (
            struct.pack("<Q", 2) + b"{}",
            f"not a ROOT momentum recording (its metadata has no format '{RECORDING_FORMAT}')",
        ),
    ],
)
def test_corrupted_or_foreign_files_are_one_error_naming_them(tmp_path, content, reason):
    path = tmp_path / "step00000001.rank0.safetensors"
    path.write_bytes(content)
    with pytest.raises(RecordingError, match=re.escape(f"cannot read momentum recording {path}: {reason}")):
        read_recordings(tmp_path)


def test_a_missing_path_is_one_error():
    with pytest.raises(
        RecordingError, match=re.escape("momentum recording path does not exist: /nonexistent")
    ):
        read_recordings("/nonexistent")


def test_the_recorder_can_be_passed_in_and_observes_nothing_between_recorded_steps(tmp_path):
    recorder = MomentumRecorder(tmp_path, every=10)
    model = make_net()
    optimizer = ROOT(model.named_parameters(), lr=0.02, recorder=recorder)
    assert optimizer.recorder is recorder
    train(model, optimizer, range(12))
    assert sorted({s.step for s in recorder.spectra()}) == [1, 11]
    assert len(recorder.spectra()) == 8 and recorder.step == 12


def test_root_param_groups_named_gives_recordings_the_model_names(tmp_path):
    from root_core import root_param_groups

    model = make_net()
    groups = root_param_groups(model, named=True)
    assert groups[0]["params"][0] == ("up.weight", model.up.weight)
    optimizer = ROOT(groups, lr=0.02, record_dir=tmp_path)
    assert optimizer.param_groups[0]["param_names"] == [
        "up.weight",
        "mid.weight",
        "mid2.weight",
        "down.weight",
    ]
    train(model, optimizer, range(1))
    assert sorted(s.name for s in read_recordings(tmp_path)) == [
        "down.weight",
        "mid.weight",
        "mid2.weight",
        "up.weight",
    ]


def test_a_step_that_fails_midway_leaves_nothing_for_the_next_recorded_step(tmp_path, monkeypatch):
    model = make_net()
    optimizer = ROOT(model.named_parameters(), lr=0.02, record_dir=tmp_path, record_every=1)
    apply_updates = optimizer._apply_updates
    calls = []

    def fail_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # after the first batch was recorded, before the step's file is written
            raise RuntimeError("out of memory")
        return apply_updates(*args, **kwargs)

    monkeypatch.setattr(optimizer, "_apply_updates", fail_once)
    with pytest.raises(RuntimeError, match="out of memory"):
        train(model, optimizer, range(1))
    monkeypatch.setattr(optimizer, "_apply_updates", apply_updates)
    train(model, optimizer, range(1, 2))
    recorded = read_recordings(tmp_path)
    assert {s.step for s in recorded} == {2} and len(recorded) == 4  # each matrix once, step 1 dropped


@pytest.mark.slow
def test_a_compiled_step_records_what_the_eager_step_records(tmp_path):
    """torch.compile without fullgraph: the graph breaks around the recorder, which runs eagerly."""
    torch.manual_seed(0)
    weight = torch.randn(16, 8)
    results = {}
    for how in ("eager", "compiled"):
        p = nn.Parameter(weight.clone())
        optimizer = ROOT([("w", p)], lr=torch.tensor(0.02), record_dir=tmp_path / how, record_every=2)
        step = torch.compile(optimizer.step) if how == "compiled" else optimizer.step
        for i in range(3):  # recorded, idle, recorded: both branches traced
            p.grad = torch.randn(16, 8, generator=torch.Generator().manual_seed(i))
            step()
        results[how] = optimizer.recorder
    compiled, eager = results["compiled"], results["eager"]
    assert [p.name for p in compiled.files] == [p.name for p in eager.files]
    for a, b in zip(compiled.spectra(), eager.spectra(), strict=True):
        assert (a.step, a.name) == (b.step, b.name) and a.step in (1, 3)
        # Compiled and eager steps differ by float32 rounding (~1e-7 of the update, test_batched_step.py).
        torch.testing.assert_close(a.singular_values, b.singular_values, rtol=1e-4, atol=1e-6)
