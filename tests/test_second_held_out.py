"""The second independent held-out set: the parallel probe family, its optimizers, its prose corpus, and
that adding them leaves every existing harvest (and its cache key) as it was."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch.nn import functional as F

from calibrate.errors import CalibrationError
from calibrate.sampling.corpus import OWN_DISTRIBUTION, dist_info_corpus_files, load_corpus
from calibrate.sampling.harvest import PHASES, HarvestRun, HarvestSettings, harvest_key, run_harvest
from calibrate.sampling.probes import (
    DEFAULT_PROBES,
    HEAD_DIM,
    HELD_OUT_PROBES,
    OPTIMIZERS,
    SECOND_HELD_OUT_PROBES,
    ProbeModel,
    parse_probe,
    parse_probes,
    target_layers,
)

TEXT = ("The quick brown fox jumps over the lazy dog. Permission is hereby granted.\n" * 60).encode()
STEPS = 8  # early 3, mid 4, late 8: the fewest steps with three distinct phases and a few updates


def test_parallel_block_layout_square_and_rectangular():
    # Square: q and o are the a×a targets next to the MLP; k and v are one head wide (multi-query).
    square = ProbeModel("parallel", (128, 128)).hidden_matrices()
    assert {name: tuple(m.shape) for name, m in square.items()} == {
        "attn.q": (128, 128),
        "attn.k": (HEAD_DIM, 128),
        "attn.v": (HEAD_DIM, 128),
        "attn.o": (128, 128),
        "mlp.up": (128, 128),
        "mlp.down": (128, 128),
    }
    assert target_layers("parallel", (128, 128)) == ("mlp.up", "mlp.down", "attn.q", "attn.o")
    # Rectangular: MLP up is (b, a) and down (a, b), the only targets; no gate (squared ReLU, not GLU).
    wide = ProbeModel("parallel", (16, 48)).hidden_matrices()
    assert (tuple(wide["mlp.up"].shape), tuple(wide["mlp.down"].shape)) == ((48, 16), (16, 48))
    assert "mlp.gate" not in wide and target_layers("parallel", (16, 48)) == ("mlp.up", "mlp.down")


def test_parallel_block_feeds_attention_and_mlp_the_same_normalized_input():
    torch.manual_seed(0)
    model = ProbeModel("parallel", (16, 48))
    assert model.norm_mlp is None and model.position is None  # one pre-norm; rotary positions
    seen = {}

    def keep(name, what):
        def hook(module, args, out):  # returns None: the layer's output is left alone
            seen.setdefault(name, args[0] if what == "in" else out)

        return hook

    model.attn["q"].register_forward_hook(keep("attention in", "in"))
    model.mlp["up"].register_forward_hook(keep("mlp in", "in"))
    model.mlp["up"].register_forward_hook(keep("up out", "out"))
    model.mlp["down"].register_forward_hook(keep("down in", "in"))
    tokens = torch.randint(0, 256, (2, 64))
    logits = model(tokens)
    assert logits.shape == (2, 64, 256) and torch.isfinite(logits).all()
    # Parallel, not sequential: the MLP reads the very tensor attention reads, not h + attention.
    assert seen["mlp in"] is seen["attention in"]
    torch.testing.assert_close(seen["down in"], F.relu(seen["up out"]).square(), rtol=0, atol=0)
    h = model.embed(tokens)
    normalized = model.norm_attn(h)
    torch.testing.assert_close(seen["attention in"], normalized)
    out = h + model._attention(normalized) + model._mlp(normalized)
    torch.testing.assert_close(logits, model.head(model.norm_out(out)))


@pytest.mark.parametrize("probe", SECOND_HELD_OUT_PROBES)
def test_harvest_with_each_second_set_probe(tmp_path, probe):
    corpus = tmp_path / "prose.txt"
    corpus.write_bytes(TEXT)
    result = run_harvest((16, 48), 3, seed=2, corpus=corpus, steps=STEPS, tokens_per_step=128, probes=[probe])
    assert [s.meta["phase"] for s in result.samples] == list(PHASES)
    assert [s.meta["step"] for s in result.samples] == [3, 8, 4]
    for sample in result.samples:
        assert sorted(sample.matrix.shape) == [16, 48] and torch.isfinite(sample.matrix).all()
        assert sample.meta["family"] == "parallel" and sample.meta["probe"] == probe
        assert sample.meta["layer"] in ("mlp.up", "mlp.down") and sample.matrix.abs().sum() > 0
    assert all(math.isfinite(loss) for loss in result.losses[probe])


def test_second_set_optimizers_reach_torch_with_their_settings():
    warm = HarvestRun((16, 48), TEXT, seed=2, probe="parallel-muon-warm", tokens_per_step=128)
    fast = HarvestRun((16, 48), TEXT, seed=2, probe="parallel-adamw-fast", tokens_per_step=128)
    muon = warm.optimizers[0].param_groups[0]
    assert isinstance(warm.optimizers[0], torch.optim.Muon)
    assert (muon["momentum"], muon["nesterov"], muon["lr"]) == (0.85, True, 0.05)
    adamw = fast.optimizers[0].param_groups[0]
    assert adamw["betas"] == (0.8, 0.99) and adamw["weight_decay"] == 0.1
    # They differ from calibration's and the first independent set's settings.
    used = {OPTIMIZERS[parse_probe(p)[1]] for p in (*DEFAULT_PROBES, *HELD_OUT_PROBES)}
    assert not used & {OPTIMIZERS["muon-warm"], OPTIMIZERS["adamw-fast"]}


# Computed before the parallel family and the second set's optimizers existed: adding them must not move
# a single existing harvest to a new cache file (caches of earlier runs stay valid).
PINNED_KEYS = {
    (DEFAULT_PROBES, (16, 48), 4, 0): "fb83ed1999c800908e2a5dc14d5d583a",
    (DEFAULT_PROBES, (32, 32), 6, 1): "63b47f1c55330420f811298e4a71f4d8",
    (HELD_OUT_PROBES, (16, 48), 4, 0): "705b368db8c3cf97265f717c872f6dfa",
    (HELD_OUT_PROBES, (32, 32), 6, 1): "9b7ef3936b33440c50f7936d36565c59",
}


@pytest.mark.parametrize(("probes", "shape", "count", "seed"), list(PINNED_KEYS))
def test_existing_probes_keep_their_cache_keys(probes, shape, count, seed):
    settings = HarvestSettings(steps=20, probes=probes, trainer="muon")
    key = harvest_key(
        shape, count, seed=seed, corpus_bytes=b"pinned corpus text " * 8, device="cpu", settings=settings
    )
    assert key == PINNED_KEYS[(probes, shape, count, seed)]


def test_bad_probe_is_still_one_line_naming_it():
    assert parse_probes(",".join(SECOND_HELD_OUT_PROBES)) == SECOND_HELD_OUT_PROBES
    with pytest.raises(CalibrationError, match=re.escape("invalid harvest probe 'parallel-sgd': ")) as error:
        parse_probes("parallel-muon-warm,parallel-sgd")
    assert "\n" not in str(error.value) and "parallel" in str(error.value) and "muon-warm" in str(error.value)
    with pytest.raises(CalibrationError, match=re.escape("invalid probe family 'palm'")):
        ProbeModel("palm", (16, 48))


def test_dist_info_corpus_is_deterministic_prose():
    files = dist_info_corpus_files()
    assert files and files == dist_info_corpus_files()
    assert all(any(part.endswith(".dist-info") for part in f.parts[:-1]) for f in files)
    assert all(f.name == "METADATA" or f.name.upper().startswith(("LICENSE", "LICENCE")) for f in files)
    assert not any(OWN_DISTRIBUTION in part for f in files for part in f.parts)
    data, description = load_corpus(files)
    assert len(data) > 10_000 and data == load_corpus(dist_info_corpus_files())[0]
    assert description.startswith(f"{len(files)} files under ") and b"Metadata-Version" in data


def test_listed_corpus_reads_files_in_order_and_names_failures(tmp_path):
    first, second = tmp_path / "b.txt", tmp_path / "a.txt"
    first.write_bytes(b"first ")
    second.write_bytes(b"second")
    assert load_corpus([first, second]) == (b"first second", f"2 files under {tmp_path.resolve()}")
    with pytest.raises(CalibrationError, match=re.escape("corpus of 0 listed files holds no text")):
        load_corpus([])
    missing = tmp_path / "gone.txt"
    with pytest.raises(CalibrationError, match=re.escape(f"cannot read corpus file {str(missing)!r}")):
        load_corpus([first, missing])
