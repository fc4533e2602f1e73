"""The built-in harvester: exact shapes, recorded Nesterov momentum, determinism, corpora, file round-trip."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from calibrate import corpus as corpus_module
from calibrate.corpus import default_corpus_files, load_corpus, split_corpus
from calibrate.errors import CalibrationError
from calibrate.sampling import harvest as harvest_module
from calibrate.sampling.harvest import (
    HARVEST_FORMAT,
    MUON_MOMENTUM,
    HarvestRun,
    harvest,
    load_harvest,
    nesterov_update,
    record_schedule,
    resolve_steps,
    resolve_trainer,
    run_harvest,
    save_harvest,
)

SHAPE = (32, 96)
STEPS = 12  # 3 warm-up steps + a few recorded: enough for every check except learning
TOKENS = 128  # two sequences per step: the tiny model trains in milliseconds per step
# A text with strong byte statistics, so a few dozen steps cut the loss well below ln 256 ≈ 5.55.
TEXT = ("def add(a, b):\n    return a + b\n\n" * 200).encode()


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_bytes(TEXT)
    return path


def _run(text_file: Path, shape=SHAPE, count=4, seed=0, **kwargs):
    kwargs = {"steps": STEPS, "tokens_per_step": TOKENS, **kwargs}
    return run_harvest(shape, count, seed=seed, corpus=text_file, **kwargs)


@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (24, 24)])
def test_samples_have_the_requested_canonical_shape(text_file, shape):
    samples = _run(text_file, shape=shape, count=3).samples
    assert len(samples) == 3
    assert all(s.shape == (min(shape), max(shape)) and s.kind == "real" for s in samples)
    assert all(s.is_finite() and s.matrix.abs().sum() > 0 for s in samples)


@pytest.mark.parametrize("count", [1, 2, 5])
def test_count_is_honoured_two_layers_per_recorded_step(text_file, count):
    samples = _run(text_file, count=count).samples
    assert len(samples) == count
    steps = [s.meta["step"] for s in samples]
    assert steps == sorted(steps) and steps[-1] <= STEPS
    assert [s.meta["layer"] for s in samples[:2]] == ["mlp.up", "mlp.down"][: len(samples[:2])]


def test_sources_and_meta(text_file):
    sample = _run(text_file, count=1, seed=7).samples[0]
    corpus = str(text_file.resolve())
    assert sample.source == f"harvest:{corpus}:mlp.up:step{STEPS}"
    meta = sample.meta
    assert meta["shape"] == list(SHAPE) and meta["step"] == STEPS and meta["layer"] == "mlp.up"
    assert meta["corpus"] == corpus and meta["seed"] == 7 and meta["momentum"] == MUON_MOMENTUM
    assert meta["loss"] > 0 and meta["lr"] > 0


def test_same_seed_gives_identical_matrices_and_another_seed_does_not(text_file):
    first, again, other = (_run(text_file, count=2, seed=s).samples for s in (3, 3, 4))
    assert all(torch.equal(a.matrix, b.matrix) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0].matrix, other[0].matrix)


def test_harvest_does_not_disturb_the_global_random_state(text_file):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _run(text_file, count=1)
    assert torch.equal(torch.rand(3), expected)


def test_loss_decreases(text_file):
    losses = _run(text_file, count=1, steps=60).losses
    assert len(losses) == 60
    start, end = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert end < 0.6 * start, (start, end)


def test_recorded_matrix_is_the_nesterov_update_muon_orthogonalises(text_file):
    run = HarvestRun(SHAPE, TEXT, seed=0, tokens_per_step=TOKENS)
    for _ in range(3):
        run.step()
    _, updates = run.step(record=True)
    # After the step, Muon's buffer is buf.lerp(g, 1-μ) and p.grad is still this step's gradient,
    # so torch.optim.Muon's own Nesterov form can be rebuilt from its state.
    for name, param in run.targets.items():
        expected = param.grad.lerp(run.muon.state[param]["momentum_buffer"], MUON_MOMENTUM)
        torch.testing.assert_close(updates[name], expected, rtol=0, atol=0)


def test_nesterov_update_leaves_the_buffer_alone():
    grad, buf = torch.randn(4, 6), torch.randn(4, 6)
    before = buf.clone()
    expected = grad + MUON_MOMENTUM * (MUON_MOMENTUM * buf + grad)  # the classic form, up to (1 − μ)
    update = nesterov_update(grad, buf, MUON_MOMENTUM)
    torch.testing.assert_close(update, grad.lerp(before.lerp(grad, 1 - MUON_MOMENTUM), MUON_MOMENTUM))
    assert torch.equal(buf, before) and not torch.allclose(update, expected)


def test_progress_advances_once_per_step(text_file):
    ticks: list[int] = []
    _run(text_file, count=1, progress=ticks.append)
    assert ticks == [1] * STEPS


def test_default_stdlib_corpus():
    samples = harvest((8, 16), 2, seed=0, steps=8)
    assert [s.source for s in samples] == ["harvest:stdlib:mlp.up:step8", "harvest:stdlib:mlp.down:step8"]


def test_default_steps():
    assert resolve_steps(SHAPE, 4) == harvest_module.MAX_DEFAULT_STEPS
    # Muon's NS on a 4096×11008 update costs about a minute per step on 2 CPU cores: with Muon only the
    # floor would fit, so "auto" trains with the normalised twin and fits ~27 steps in the budget.
    assert resolve_steps((4096, 11008), 4, trainer="muon") == harvest_module.MIN_WARMUP_STEPS + 2
    assert resolve_trainer((4096, 11008)) == "nesterov" and resolve_trainer((64, 256)) == "muon"
    assert resolve_steps((4096, 11008), 4) >= 20
    assert resolve_steps((4096, 11008), 4, device="cuda") == harvest_module.MAX_DEFAULT_STEPS
    assert resolve_trainer((4096, 11008), device="cuda") == "muon"
    assert record_schedule(100, 6) == [51, 75, 100]


def test_normalised_trainer_records_the_same_momentum_form_and_learns(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    result = run_harvest((16, 48), 2, seed=0, corpus=corpus, steps=30, trainer="nesterov")
    assert [s.meta["trainer"] for s in result.samples] == ["nesterov", "nesterov"]
    assert result.losses[-1] < 0.8 * result.losses[0]


def test_unknown_trainer_is_named():
    with pytest.raises(
        CalibrationError, match=re.escape("invalid harvest trainer 'sgd': expected one of auto, muon")
    ):
        resolve_trainer((16, 48), "sgd")


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((0, 5), "harvest shape must be two positive integers, got (0, 5)"),
        ((4096,), "harvest shape must be two positive integers, got (4096,)"),
        ((4.0, 8), "harvest shape must be two positive integers, got (4.0, 8)"),
    ],
)
def test_invalid_shape(shape, message):
    with pytest.raises(CalibrationError, match=re.escape(message)):
        harvest(shape, 2, seed=0)


@pytest.mark.parametrize("count", [0, -1, 2.5, True])
def test_invalid_count(count):
    with pytest.raises(
        CalibrationError, match=re.escape(f"harvest sample count must be a positive integer, got {count!r}")
    ):
        harvest(SHAPE, count, seed=0)


def test_too_few_steps_for_the_count(text_file):
    message = "harvest steps 5 are too few for 6 samples: need at least 6 (3 warm-up + 3 recorded)"
    with pytest.raises(CalibrationError, match=re.escape(message)):
        harvest(SHAPE, 6, seed=0, corpus=text_file, steps=5)


def test_missing_corpus_is_named(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(CalibrationError, match=re.escape(f"corpus {str(missing)!r} does not exist")):
        harvest(SHAPE, 2, seed=0, corpus=missing)


def test_empty_and_short_corpora(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CalibrationError, match=re.escape(f"corpus {str(empty)!r} holds no text")):
        load_corpus(empty)
    short = tmp_path / "short.txt"
    short.write_bytes(b"tiny")
    with pytest.raises(CalibrationError, match=re.escape("corpus too short: 4 bytes, need at least 65")):
        harvest(SHAPE, 2, seed=0, corpus=short, steps=STEPS)


def test_unreadable_corpus_file_is_named(text_file, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "open", refuse)
    message = f"cannot read corpus file {str(text_file)!r}: Permission denied"
    with pytest.raises(CalibrationError, match=re.escape(message)):
        load_corpus(text_file)


def test_folder_corpus_reads_text_files_in_order_and_skips_binary(tmp_path):
    (tmp_path / "b.txt").write_bytes(b"second")
    (tmp_path / "a.txt").write_bytes(b"first ")
    (tmp_path / "blob.bin").write_bytes(b"\0\1\2")
    data, description = load_corpus(tmp_path)
    assert data == b"first second" and description == str(tmp_path.resolve())
    assert load_corpus(tmp_path, max_bytes=4)[0] == b"firs"


def test_default_corpus_is_the_stdlib_without_tests_or_site_packages():
    files = default_corpus_files()
    assert files == sorted(files) and len(files) > 100
    assert all(f.suffix == ".py" for f in files)
    assert not any({"site-packages", "test", "tests"} & set(f.parts) for f in files)
    data, description = load_corpus(None, max_bytes=10_000)
    assert description == corpus_module.DEFAULT_CORPUS_NAME and len(data) == 10_000


def test_split_corpus():
    assert split_corpus(b"abcdefghij", 0.2) == (b"abcdefgh", b"ij")
    with pytest.raises(CalibrationError, match=re.escape("validation fraction must be in [0, 1), got 1.5")):
        split_corpus(b"abc", 1.5)


def test_save_and_load_round_trip(text_file, tmp_path):
    samples = _run(text_file, count=3).samples
    path = save_harvest(samples, tmp_path / "h.safetensors")
    loaded = load_harvest(path)
    assert [s.source for s in loaded] == [s.source for s in samples]
    assert [s.meta for s in loaded] == [s.meta for s in samples]
    assert all(
        torch.equal(a.matrix, b.matrix) and b.kind == "real" for a, b in zip(samples, loaded, strict=True)
    )
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == HARVEST_FORMAT
    entry = json.loads(metadata[f"mlp.up.step{samples[0].meta['step']}"])
    assert {"shape", "step", "layer", "source", "corpus", "seed"} <= entry.keys()


def test_save_keeps_duplicate_layer_steps_apart(text_file, tmp_path):
    samples = _run(text_file, count=1).samples + _run(text_file, count=1, seed=1).samples
    loaded = load_harvest(save_harvest(samples, tmp_path / "two.safetensors"))
    assert [s.meta["seed"] for s in loaded] == [0, 1]


def test_save_refuses_to_overwrite(text_file, tmp_path):
    samples = _run(text_file, count=1).samples
    path = save_harvest(samples, tmp_path / "h.safetensors")
    with pytest.raises(CalibrationError, match=re.escape(f"harvest file {str(path)!r} exists")):
        save_harvest(samples, path)
    save_harvest(samples, path, overwrite=True)


def test_save_is_atomic(text_file, tmp_path, monkeypatch):
    samples = _run(text_file, count=1).samples

    def half_written(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(harvest_module, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        save_harvest(samples, tmp_path / "h.safetensors")
    assert list(tmp_path.iterdir()) == [text_file]


def test_load_rejects_other_files(tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(CalibrationError, match=re.escape(f"harvest file {str(missing)!r} does not exist")):
        load_harvest(missing)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(CalibrationError, match=re.escape(f"cannot read harvest file {str(junk)!r}")):
        load_harvest(junk)
