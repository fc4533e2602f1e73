"""The built-in harvester: exact shapes, recorded Nesterov momentum, determinism, corpora, file round-trip."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from calibrate.cli import app
from calibrate.errors import CalibrationError
from calibrate.sampling import corpus as corpus_module
from calibrate.sampling import harvest as harvest_module
from calibrate.sampling.corpus import default_corpus_files, load_corpus, split_corpus
from calibrate.sampling.harvest import (
    HARVEST_FORMAT,
    MUON_MOMENTUM,
    HarvestRun,
    HarvestSettings,
    harvest,
    harvest_key,
    harvest_run_steps,
    load_harvest,
    nesterov_update,
    phase_steps,
    record_plan,
    resolve_steps,
    resolve_trainer,
    run_harvest,
    save_harvest,
)
from calibrate.sampling.probes import DEFAULT_PROBES, OPTIMIZERS, ProbeModel, parse_probes, target_layers
from root_core import files as files_module

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
def test_count_is_honoured_in_plan_order(text_file, count):
    samples = _run(text_file, count=count).samples
    assert len(samples) == count
    plan = record_plan(SHAPE, STEPS, count)
    assert [(s.meta["probe"], s.meta["phase"], s.meta["step"], s.meta["layer"]) for s in samples] == [
        (r.probe, r.phase, r.step, r.layer) for r in plan
    ]


def test_sources_and_meta(text_file):
    first, second = _run(text_file, count=2, seed=7).samples
    corpus = str(text_file.resolve())
    early = phase_steps(STEPS)["early"]
    assert first.source == f"harvest:{corpus}:llama-muon:mlp.up:step{early}"
    assert second.source == f"harvest:{corpus}:gpt-adamw:mlp.down:step{STEPS}"
    meta = first.meta
    assert meta["shape"] == list(SHAPE) and meta["step"] == early and meta["layer"] == "mlp.up"
    assert meta["corpus"] == corpus and meta["seed"] == 7 and meta["momentum"] == MUON_MOMENTUM
    assert meta["loss"] > 0 and meta["lr"] > 0 and meta["run_steps"] == STEPS
    assert (meta["phase"], meta["family"], meta["optimizer"], meta["state"]) == (
        "early",
        "llama",
        "muon",
        "momentum_buffer",
    )
    assert (second.meta["phase"], second.meta["family"], second.meta["state"]) == ("late", "gpt", "exp_avg")


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
    result = _run(text_file, count=2, steps=60)
    assert list(result.losses) == ["llama-muon", "gpt-adamw"]
    losses = result.losses["gpt-adamw"]  # the late snapshot's run: the whole 60 steps
    assert len(losses) == 60 and len(result.losses["llama-muon"]) == phase_steps(60)["early"]
    start, end = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert end < 0.6 * start, (start, end)


def test_recorded_matrix_is_the_nesterov_update_muon_orthogonalises(text_file):
    run = HarvestRun(SHAPE, TEXT, seed=0, tokens_per_step=TOKENS)
    assert isinstance(run.optimizers[0], torch.optim.Muon)  # the real one, not a stand-in
    buffers = {}
    for _ in range(3):
        run.step()
    for name, param in run.targets.items():
        buffers[name] = run.optimizers[0].state[param]["momentum_buffer"].clone()
    _, updates = run.step(record=list(run.targets))
    # p.grad is still this step's gradient, so torch.optim.Muon's own Nesterov form can be rebuilt
    # from the buffer before the step.
    for name, param in run.targets.items():
        expected = nesterov_update(param.grad, buffers[name], MUON_MOMENTUM)
        torch.testing.assert_close(updates[name], expected, rtol=1e-6, atol=1e-9)


def test_muon_without_nesterov_records_the_buffer_and_adamw_its_exp_avg():
    plain = HarvestRun(SHAPE, TEXT, seed=0, probe="postln-muon-plain", tokens_per_step=TOKENS)
    adamw = HarvestRun(SHAPE, TEXT, seed=0, probe="gpt-adamw", tokens_per_step=TOKENS)
    assert isinstance(adamw.optimizers[0], torch.optim.AdamW) and len(adamw.optimizers) == 1
    for run, key in ((plain, "momentum_buffer"), (adamw, "exp_avg")):
        run.step()
        _, recorded = run.step(record=["mlp.up"])
        state = run.optimizers[0].state[run.targets["mlp.up"]][key]
        assert torch.equal(recorded["mlp.up"], state) and recorded["mlp.up"] is not state
    assert plain.optimizers[0].param_groups[0]["nesterov"] is False
    assert adamw.optimizers[0].param_groups[0]["betas"] == (0.9, 0.95)


@pytest.mark.parametrize("family", ["llama", "gpt", "postln", "parallel"])
@pytest.mark.parametrize("shape", [(32, 96), (24, 24), (16, 64)])
def test_every_family_holds_the_target_shape_as_real_layers(family, shape):
    model = ProbeModel(family, shape)
    layers = target_layers(family, shape)
    matrices = model.hidden_matrices()
    assert layers and layers[:2] == ("mlp.up", "mlp.down")
    assert all(tuple(sorted(matrices[name].shape)) == shape for name in layers)
    assert model(torch.randint(0, 256, (2, 64))).shape == (2, 64, 256)


def test_family_layouts():
    # GPT's fused QKV is (3d)×d: at (a, 3a) it is a target too; LLaMA has separate q/k/v and a gate.
    assert "attn.qkv" in target_layers("gpt", (32, 96)) and "attn.qkv" not in target_layers("gpt", (32, 128))
    assert target_layers("llama", (32, 128)) == ("mlp.up", "mlp.down", "mlp.gate")
    assert {"attn.q", "attn.k", "attn.v", "attn.o"} <= set(target_layers("llama", (24, 24)))
    # Grouped-query attention in the held-out family: k and v narrower than q.
    matrices = ProbeModel("postln", (128, 128)).hidden_matrices()
    assert matrices["attn.k"].shape[0] == matrices["attn.q"].shape[0] // 4


def test_nesterov_update_leaves_the_buffer_alone():
    grad, buf = torch.randn(4, 6), torch.randn(4, 6)
    before = buf.clone()
    expected = grad + MUON_MOMENTUM * (MUON_MOMENTUM * buf + grad)  # the classic form, up to (1 − μ)
    update = nesterov_update(grad, buf, MUON_MOMENTUM)
    torch.testing.assert_close(update, grad.lerp(before.lerp(grad, 1 - MUON_MOMENTUM), MUON_MOMENTUM))
    assert torch.equal(buf, before) and not torch.allclose(update, expected)


def test_progress_advances_once_per_step(text_file):
    ticks: list[int] = []
    _run(text_file, count=3, progress=ticks.append)
    steps = phase_steps(STEPS)
    assert ticks == [1] * harvest_run_steps(SHAPE, 3, STEPS) == [1] * (steps["early"] + STEPS + steps["mid"])


def test_default_stdlib_corpus():
    samples = harvest((8, 16), 2, seed=0, steps=8)
    assert [s.source for s in samples] == [
        "harvest:stdlib:llama-muon:mlp.up:step3",
        "harvest:stdlib:gpt-adamw:mlp.down:step8",
    ]


def test_default_steps():
    assert resolve_steps(SHAPE, 4) == harvest_module.MAX_DEFAULT_STEPS
    # Muon's NS on a 4096×11008 update costs about a minute per step on 2 CPU cores: with Muon only the
    # floor would fit, so "auto" trains with the normalised twin and fits 9 steps in the budget
    # (4 runs: two LLaMA-style ones to the early step, GPT-style ones to the middle and to the last).
    assert resolve_steps((4096, 11008), 4, trainer="muon") == harvest_module.MIN_HARVEST_STEPS
    assert resolve_trainer((4096, 11008)) == "nesterov" and resolve_trainer((64, 256)) == "muon"
    assert resolve_steps((4096, 11008), 4) == 9
    assert resolve_steps((4096, 11008), 4, device="cuda") == harvest_module.MAX_DEFAULT_STEPS
    assert resolve_trainer((4096, 11008), device="cuda") == "muon"


def test_phase_steps():
    assert phase_steps(300) == {"early": 6, "mid": 150, "late": 300}
    assert phase_steps(12) == {"early": 3, "mid": 6, "late": 12}
    assert phase_steps(5) == {"early": 3, "mid": 4, "late": 5}


@pytest.mark.parametrize("count", [1, 2, 3, 4, 6, 12])
def test_default_mix_covers_phases_families_and_optimizers(count):
    plan = record_plan((64, 256), 300, count)
    phases = {r.phase for r in plan}
    families = {r.probe.split("-")[0] for r in plan}
    optimizers = {r.probe.split("-")[1] for r in plan}
    # 1 sample: early; 2: early + late, both families, both optimizers; 3 or more: every phase.
    assert phases == (
        {"early"} if count == 1 else {"early", "late"} if count == 2 else {"early", "mid", "late"}
    )
    if count >= 2:
        assert families == {"llama", "gpt"} and optimizers == {"muon", "adamw"}
    if count == 12:
        assert len({(r.probe, r.phase) for r in plan}) == 12
    assert len({(r.probe, r.step, r.layer) for r in plan}) == count  # no matrix recorded twice


def test_repeated_probe_and_phase_take_other_layers_then_earlier_steps():
    plan = record_plan((64, 256), 300, 10, ["gpt-muon"])
    late = [(r.step, r.layer) for r in plan if r.phase == "late"]
    assert late == [(300, "mlp.down"), (300, "mlp.up"), (299, "mlp.down")]


def test_unknown_probe_is_named():
    message = "invalid harvest probe 'llama-sgd': expected FAMILY-OPTIMIZER with a family of llama, gpt"
    with pytest.raises(CalibrationError, match=re.escape(message)):
        parse_probes("llama-muon,llama-sgd")
    assert parse_probes(None) == DEFAULT_PROBES and parse_probes(" gpt-muon ") == ("gpt-muon",)


def _key(**changes) -> str:
    arguments = {"shape": (32, 96), "count": 4, "seed": 0, "corpus_bytes": b"text", "device": "cpu"}
    settings = HarvestSettings(steps=12, probes=DEFAULT_PROBES, trainer="muon")
    settings_fields = {k: changes.pop(k) for k in list(changes) if hasattr(settings, k)}
    settings = HarvestSettings(**{**settings.__dict__, **settings_fields})
    return harvest_key(**{**arguments, **changes}, settings=settings)


@pytest.mark.parametrize(
    "change",
    [
        {"shape": (32, 128)},
        {"count": 5},
        {"seed": 1},
        {"corpus_bytes": b"other"},
        {"device": "cuda"},
        {"steps": 13},
        {"probes": ("gpt-muon", "llama-adamw")},
        {"trainer": "nesterov"},
        {"ns_steps": 5},
        {"tokens_per_step": 256},
    ],
)
def test_cache_key_covers_every_setting(change):
    assert _key(**change) != _key()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("EARLY_FRACTION", 0.05),
        ("MID_FRACTION", 0.6),
        ("MIN_EARLY_STEP", 2),
        ("ADAMW_LR", 1e-3),
        ("HEAD_LR_WIDTH", 512),
    ],
)
def test_cache_key_covers_phases_and_learning_rates(monkeypatch, name, value):
    before = _key()
    monkeypatch.setattr(harvest_module, name, value)
    assert _key() != before


@pytest.mark.parametrize("field", ["lr", "momentum", "nesterov", "beta2", "weight_decay"])
def test_cache_key_covers_optimizer_settings(monkeypatch, field):
    before = _key()
    config = OPTIMIZERS["muon"]
    value = not config.nesterov if field == "nesterov" else getattr(config, field) + 0.01
    monkeypatch.setitem(OPTIMIZERS, "muon", dataclasses.replace(config, **{field: value}))
    assert _key() != before


def test_normalised_trainer_records_the_same_momentum_form_and_learns(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    result = run_harvest((16, 48), 1, seed=0, corpus=corpus, steps=30, trainer="nesterov", probes="gpt-muon")
    assert [s.meta["trainer"] for s in result.samples] == ["nesterov"]
    run = HarvestRun((16, 48), b"x" * 100, seed=0, probe="gpt-muon", trainer="nesterov")
    assert not isinstance(run.optimizers[0], torch.optim.Muon)
    result = run_harvest((16, 48), 2, seed=0, corpus=corpus, steps=30, trainer="nesterov", probes="gpt-muon")
    losses = result.losses["gpt-muon"]
    assert losses[-1] < 0.8 * losses[0]


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
    message = "harvest steps 4 are too few: need at least 5 (distinct early, middle and late snapshots)"
    with pytest.raises(CalibrationError, match=re.escape(message)):
        harvest(SHAPE, 6, seed=0, corpus=text_file, steps=4)


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
    entry = json.loads(metadata[f"llama-muon.mlp.up.step{samples[0].meta['step']}"])
    assert {"shape", "step", "layer", "source", "corpus", "seed", "phase", "probe"} <= entry.keys()


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

    def disk_full(descriptor):
        raise OSError("disk full")  # after the bytes went to the temporary file

    monkeypatch.setattr(files_module.os, "fsync", disk_full)
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


def test_cli_probes_option_reaches_the_harvest(tmp_path):
    out = tmp_path / "h.safetensors"
    args = ["harvest", "--shapes", "8x16", "--count", "2", "--steps", "6", "--quiet", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--probes", "gpt-muon,postln-adamw"])
    assert result.exit_code == 0, result.output
    assert [s.meta["probe"] for s in load_harvest(out)] == ["gpt-muon", "postln-adamw"]


@pytest.mark.parametrize("command", [["harvest", "--out", "h.safetensors"], ["calibrate", "--out", "t"]])
def test_cli_rejects_an_unknown_probe_in_one_line(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [*command, "--shapes", "8x16", "--probes", "gpt-sgd", "--quiet"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: invalid harvest probe 'gpt-sgd'")
    assert list(tmp_path.iterdir()) == []
