"""Calibration samples: seeded synthetic families, real momentum from files, the ratio and the split."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import save_file

from calibrate.errors import CalibrationError
from calibrate.sampling import Sample, synthetic
from calibrate.sampling.harvest import HARVEST_FORMAT
from calibrate.sampling.mix import (
    parse_ratio,
    reject_non_finite,
    split_counts,
    train_validation_split,
)
from calibrate.sampling.real import (
    HARVEST_FORMAT_PREFIX,
    MOMENTUM_METADATA,
    load_real_samples,
    validate_real_paths,
)
from calibrate.sampling.synthetic import DEFAULT_MIX, FAMILIES, family_at, synthetic_sample, synthetic_samples

SMALL = (16, 48)
STATS_SHAPE = (128, 384)
# Six per family at STATS_SHAPE: enough to see each family's parameter range, well under a second.
STATS_COUNT = 6 * len(FAMILIES)

# Largest and smallest singular values of an m×n N(0, s²) matrix approach s·(√n ± √m). Over 180 draws at
# 128×384 (seeds 0–29) the upper edge stayed within 3.6% of it and the lower edge, which carries a larger
# finite-size shift, within 9.5%.
MP_UPPER_EDGE_TOLERANCE = 0.05
MP_LOWER_EDGE_TOLERANCE = 0.15
GAUSSIAN_KURTOSIS = 3.0
# Sample kurtosis of 49,152 Gaussian entries has standard deviation √(24/N) ≈ 0.02 (180 draws: ≤ 0.052 off).
GAUSSIAN_KURTOSIS_TOLERANCE = 0.15
# Student-t with ν ≤ 6 has excess kurtosis ≥ 3 (infinite for ν ≤ 4); finite samples fall short of that,
# but stay far above the Gaussian's 3 + 0.15 (180 draws: lowest 5.1).
HEAVY_TAIL_MIN_KURTOSIS = 4.0
# Gaussian noise's spectral norm is at most std·(√m + √n) up to the same edge fluctuation; by Weyl each
# singular value of low-rank + noise lies within that norm of the low-rank part's (180 draws: ≤ 1.02 of it).
NOISE_NORM_TOLERANCE = 1.1
# Max/min row norm of a 128×384 Gaussian is ~1.2 (180 draws: ≤ 1.30); per-row log-normal scales with
# std ≥ 0.1 over 128 rows spread it further (180 draws: ≥ 1.78).
ROW_SPREAD_GAUSSIAN_MAX = 1.5


def raises(message: str):
    """pytest.raises(CalibrationError) pinned to a literal part of the message."""
    return pytest.raises(CalibrationError, match=re.escape(message))


def by_family(samples: list[Sample], family: str) -> list[Sample]:
    return [s for s in samples if s.meta["family"] == family]


@pytest.fixture(scope="module")
def stats_samples() -> list[Sample]:
    return synthetic_samples(STATS_SHAPE, STATS_COUNT, seed=11, families=list(FAMILIES))


# --- synthetic: determinism -------------------------------------------------------------------------


def test_same_seed_gives_bit_identical_samples():
    first = synthetic_samples(SMALL, 8, seed=3)
    second = synthetic_samples(SMALL, 8, seed=3)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.matrix, b.matrix)
        assert a.meta == b.meta and a.source == b.source


def test_different_seed_gives_different_samples():
    first = synthetic_samples(SMALL, 4, seed=3)
    second = synthetic_samples(SMALL, 4, seed=4)
    assert all(not torch.equal(a.matrix, b.matrix) for a, b in zip(first, second, strict=True))


def test_drawing_more_keeps_the_first_samples():
    three = synthetic_samples(SMALL, 3, seed=5)
    six = synthetic_samples(SMALL, 6, seed=5)
    for a, b in zip(three, six[:3], strict=True):
        assert torch.equal(a.matrix, b.matrix)


def test_one_sample_alone_matches_the_batch():
    batch = synthetic_samples(SMALL, 6, seed=5)
    alone = synthetic_sample(SMALL, 5, seed=5, family=batch[5].meta["family"])
    assert torch.equal(alone.matrix, batch[5].matrix)


def test_orientation_does_not_change_the_sample():
    wide = synthetic_samples((16, 48), 4, seed=1)
    tall = synthetic_samples((48, 16), 4, seed=1)
    for a, b in zip(wide, tall, strict=True):
        assert b.shape == (16, 48)
        assert torch.equal(a.matrix, b.matrix)


# --- synthetic: structure and errors ----------------------------------------------------------------


def test_families_cycle_and_record_provenance():
    samples = synthetic_samples(SMALL, 2 * len(FAMILIES), seed=9, families=list(FAMILIES))
    names = list(FAMILIES)
    for index, sample in enumerate(samples):
        family = names[index % len(names)]
        assert sample.kind == "synthetic"
        assert sample.source == f"synthetic:{family}"
        assert sample.meta["family"] == family
        assert sample.meta["seed"] == 9 and sample.meta["index"] == index
        assert sample.meta["params"]["scale"] > 0
        assert sample.shape == SMALL and sample.matrix.dtype == torch.float32


def test_default_mix_is_three_quarters_power_law_and_keeps_every_family():
    samples = synthetic_samples(SMALL, 2 * len(DEFAULT_MIX), seed=9)
    families = [s.meta["family"] for s in samples]
    assert families == [family_at(i) for i in range(len(samples))] == list(DEFAULT_MIX) * 2
    assert families.count("low_rank_noise") == len(samples) * 3 // 4
    assert set(families) == set(FAMILIES)


def test_repeated_family_names_weigh_the_cycle():
    samples = synthetic_samples(SMALL, 6, seed=0, families=["gaussian", "gaussian", "heavy_tailed"])
    assert [s.meta["family"] for s in samples] == ["gaussian", "gaussian", "heavy_tailed"] * 2
    # A sample depends on (seed, shape, family, index) only, not on the cycle that chose its family.
    alone = synthetic_samples(SMALL, 2, seed=0, families=["heavy_tailed"])[1]
    assert not torch.equal(alone.matrix, samples[2].matrix)
    assert torch.equal(
        synthetic_samples(SMALL, 3, seed=0, families=["heavy_tailed"])[2].matrix, samples[2].matrix
    )


def test_family_subset():
    samples = synthetic_samples(SMALL, 3, seed=0, families=["heavy_tailed"])
    assert [s.source for s in samples] == ["synthetic:heavy_tailed"] * 3


def test_family_parameters_vary_per_sample():
    samples = synthetic_samples(SMALL, 3, seed=0, families=["low_rank_noise"])
    alphas = {s.meta["params"]["alpha"] for s in samples}
    assert len(alphas) == 3


def test_unknown_family_lists_the_choices():
    with raises("unknown synthetic family 'laplace'; choose from gaussian, heavy_tailed, low_rank_noise"):
        synthetic_samples(SMALL, 2, seed=0, families=["gaussian", "laplace"])


def test_negative_count_and_empty_families_are_errors():
    with raises("synthetic sample count must be >= 0, got -1"):
        synthetic_samples(SMALL, -1, seed=0)
    with raises("no synthetic families given"):
        synthetic_samples(SMALL, 1, seed=0, families=[])


def test_bad_shape_is_a_calibration_error():
    with raises("shape must be two positive integers"):
        synthetic_samples((0, 5), 1, seed=0)


def test_smoke_at_a_model_shape():
    samples = synthetic_samples((1408, 512), len(FAMILIES), seed=0)
    assert [s.shape for s in samples] == [(512, 1408)] * len(FAMILIES)
    assert all(s.is_finite() and s.matrix.abs().max() > 0 for s in samples)


# --- synthetic: statistical character -----------------------------------------------------------------


def kurtosis(matrix: torch.Tensor) -> float:
    x = matrix.double().flatten()
    x = x - x.mean()
    return float((x**4).mean() / (x**2).mean() ** 2)


def test_gaussian_singular_values_fill_the_marchenko_pastur_bulk(stats_samples):
    m, n = STATS_SHAPE
    for sample in by_family(stats_samples, "gaussian"):
        scale = sample.meta["params"]["scale"]
        singular = torch.linalg.svdvals(sample.matrix.double())
        upper, lower = scale * (math.sqrt(n) + math.sqrt(m)), scale * (math.sqrt(n) - math.sqrt(m))
        assert singular.max() == pytest.approx(upper, rel=MP_UPPER_EDGE_TOLERANCE)
        assert singular.min() == pytest.approx(lower, rel=MP_LOWER_EDGE_TOLERANCE)


def test_heavy_tailed_has_outliers_gaussian_has_none(stats_samples):
    for sample in by_family(stats_samples, "gaussian"):
        assert kurtosis(sample.matrix) == pytest.approx(GAUSSIAN_KURTOSIS, abs=GAUSSIAN_KURTOSIS_TOLERANCE)
    heavy = by_family(stats_samples, "heavy_tailed")
    assert all(1.5 <= s.meta["params"]["df"] <= 6 for s in heavy)
    assert all(kurtosis(s.matrix) > HEAVY_TAIL_MIN_KURTOSIS for s in heavy)


def test_low_rank_noise_follows_its_power_law(stats_samples):
    m, n = STATS_SHAPE
    for sample in by_family(stats_samples, "low_rank_noise"):
        params = sample.meta["params"]
        rank, alpha = params["rank"], params["alpha"]
        low, high = (max(1, round(m * f)) for f in synthetic.RANK_FRACTION_RANGE)
        assert low <= rank <= high and synthetic.ALPHA_RANGE[0] <= alpha <= synthetic.ALPHA_RANGE[1]
        sigma = params["scale"] * torch.arange(1, rank + 1, dtype=torch.float64) ** -alpha
        noise_std = params["noise_level"] * float(sigma.norm()) / math.sqrt(m * n)
        noise_norm = noise_std * (math.sqrt(m) + math.sqrt(n)) * NOISE_NORM_TOLERANCE
        singular = torch.linalg.svdvals(sample.matrix.double())
        assert torch.all((singular[:rank] - sigma).abs() <= noise_norm)
        # Beyond the rank only noise is left.
        assert torch.all(singular[rank:] <= noise_norm)


def test_row_col_scaled_has_per_feature_magnitudes(stats_samples):
    def row_spread(sample: Sample) -> float:
        norms = sample.matrix.norm(dim=1)
        return float(norms.max() / norms.min())

    assert all(row_spread(s) < ROW_SPREAD_GAUSSIAN_MAX for s in by_family(stats_samples, "gaussian"))
    assert all(row_spread(s) > ROW_SPREAD_GAUSSIAN_MAX for s in by_family(stats_samples, "row_col_scaled"))


# --- real momentum from files -----------------------------------------------------------------------


def harvest_meta(step: int) -> str:
    return json.dumps({"shape": [48, 16], "step": step, "layer": "mlp.up", "source": "harvest:stdlib"})


@pytest.fixture
def safetensors_file(tmp_path):
    path = tmp_path / "harvest.safetensors"
    tensors = {
        "mlp.up.step40": torch.randn(48, 16),
        "mlp.down.step40": torch.randn(16, 48),
        "norm": torch.randn(48),
        "attn": torch.randn(8, 8),
    }
    metadata = {"mlp.up.step40": harvest_meta(40), "corpus": "stdlib", **MOMENTUM_METADATA}
    save_file(tensors, str(path), metadata=metadata)
    return path, tensors


def test_safetensors_matches_either_orientation_and_keeps_metadata(safetensors_file):
    path, tensors = safetensors_file
    found = load_real_samples([path], [(16, 48), (64, 64)])
    assert list(found) == [(16, 48), (64, 64)] and found[(64, 64)] == []
    # safetensors lists tensors by name, so "mlp.down" comes first.
    down, up = found[(16, 48)]
    assert up.source == f"file:{path}:mlp.up.step40" and up.kind == "real"
    assert torch.equal(up.matrix, tensors["mlp.up.step40"].T)
    assert up.meta["step"] == 40 and up.meta["layer"] == "mlp.up" and up.meta["source"] == "harvest:stdlib"
    assert up.meta["stored_shape"] == [48, 16]
    assert up.meta["file_metadata"] == {"corpus": "stdlib", **MOMENTUM_METADATA}
    assert down.source == f"file:{path}:mlp.down.step40" and "step" not in down.meta


def test_torch_tensor_and_nested_dict(tmp_path):
    tensor_path, dict_path = tmp_path / "one.momentum.pt", tmp_path / "many.momentum.pth"
    torch.save(torch.randn(16, 48), tensor_path)
    nested = {
        "layers": {"0": {"w": torch.randn(48, 16), "b": torch.randn(16)}},
        "extra": [torch.randn(16, 48)],
    }
    torch.save(nested, dict_path)
    found = load_real_samples([tensor_path, dict_path], [(48, 16)])[(16, 48)]
    assert [s.source for s in found] == [
        f"file:{tensor_path}",
        f"file:{dict_path}:layers.0.w",
        f"file:{dict_path}:extra.0",
    ]


def test_conv_weight_is_flattened(tmp_path):
    path = tmp_path / "conv.momentum.pt"
    conv = torch.randn(16, 4, 3, 4)
    torch.save({"conv": conv}, path)
    (sample,) = load_real_samples([path], [(16, 48)])[(16, 48)]
    assert torch.equal(sample.matrix, conv.reshape(16, 48))
    assert sample.meta["stored_shape"] == [16, 4, 3, 4]


def trained_optimizer(optimizer_class, **options):
    torch.manual_seed(0)
    model = torch.nn.Linear(48, 16)
    optimizer = optimizer_class(model.named_parameters(), lr=0.01, **options)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(4, 48)).square().sum().backward()
        optimizer.step()
    return model, optimizer


def test_sgd_state_dict_yields_the_momentum_buffer(tmp_path):
    model, optimizer = trained_optimizer(torch.optim.SGD, momentum=0.9)
    path = tmp_path / "sgd.pt"
    torch.save(optimizer.state_dict(), path)
    (sample,) = load_real_samples([path], [(16, 48)])[(16, 48)]
    assert sample.source == f"file:{path}:state.0.momentum_buffer"
    assert sample.meta["param_name"] == "weight"
    assert torch.equal(sample.matrix, optimizer.state[model.weight]["momentum_buffer"])


def test_adam_state_dict_yields_exp_avg_only(tmp_path):
    model, optimizer = trained_optimizer(torch.optim.Adam)
    path = tmp_path / "adam.bin"
    torch.save(optimizer.state_dict(), path)
    (sample,) = load_real_samples([path], [(16, 48)])[(16, 48)]
    assert sample.source == f"file:{path}:state.0.exp_avg"
    assert torch.equal(sample.matrix, optimizer.state[model.weight]["exp_avg"])


def test_training_checkpoint_yields_momentum_not_weights(tmp_path):
    model, optimizer = trained_optimizer(torch.optim.SGD, momentum=0.9)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    found = load_real_samples([path], [(16, 48)])[(16, 48)]
    assert [s.source for s in found] == [f"file:{path}:optimizer.state.0.momentum_buffer"]


def test_folder_is_searched_recursively_in_sorted_order(tmp_path, safetensors_file):
    folder = tmp_path / "run"
    (folder / "sub").mkdir(parents=True)
    torch.save(torch.randn(16, 48), folder / "b.momentum.pt")
    torch.save(torch.randn(16, 48), folder / "sub" / "a.momentum.pt")
    (folder / "notes.txt").write_text("not momentum")
    found = load_real_samples([folder], [(16, 48)])[(16, 48)]
    expected = [folder / "b.momentum.pt", folder / "sub" / "a.momentum.pt"]
    assert [s.source for s in found] == [f"file:{path}" for path in expected]


def test_non_finite_tensor_is_rejected_by_name(tmp_path):
    path = tmp_path / "bad.safetensors"
    bad = torch.randn(16, 48)
    bad[3, 4] = float("nan")
    save_file({"good": torch.randn(16, 48), "layers.1.w": bad}, str(path), metadata=MOMENTUM_METADATA)
    with raises(f"real momentum {path}:layers.1.w contains NaN or Inf"):
        load_real_samples([path], [(16, 48)])


def test_non_finite_tensor_of_another_shape_is_ignored(tmp_path):
    path = tmp_path / "other.momentum.pt"
    torch.save({"w": torch.randn(16, 48), "other": torch.full((8, 8), float("inf"))}, path)
    assert len(load_real_samples([path], [(16, 48)])[(16, 48)]) == 1


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with raises(f"real momentum path does not exist: {missing}"):
        validate_real_paths([missing])
    with raises(f"real momentum path does not exist: {missing}"):
        load_real_samples([missing], [(16, 48)])


@pytest.mark.parametrize("name", ["corrupt.safetensors", "corrupt.pt"])
def test_corrupt_file_is_named(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x00\x01 definitely not a tensor file")
    with raises(f"cannot read real momentum file {path}: "):
        load_real_samples([path], [(16, 48)])


def test_pickled_module_is_refused_with_the_reason(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(48, 16), path)
    message = "only tensors and dicts of tensors can be loaded safely (Unsupported global: GLOBAL torch.nn"
    with raises(f"cannot read real momentum file {path}: {message}"):
        load_real_samples([path], [(16, 48)])


WEIGHTS_REFUSED = (
    "holds plain tensors not marked as momentum (model weights look the same); mark momentum with "
    'safetensors metadata {"root_calibrate": "momentum"}, a *.momentum.safetensors / *.momentum.pt name, '
    "an optimizer state_dict (momentum_buffer / exp_avg) or a `root-calibrate harvest` file"
)


def test_model_weights_are_refused_with_the_ways_to_mark_momentum(tmp_path):
    # A Hugging Face checkpoint folder: weights of exactly the model's shapes, named like layers.
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    weights = {"model.layers.0.mlp.up_proj.weight": torch.randn(48, 16)}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text("{}")
    with raises(f"real momentum file {folder / 'model.safetensors'} {WEIGHTS_REFUSED}, or pass --flag"):
        load_real_samples([folder], [(16, 48)], flag="--flag")
    torch.save(weights, tmp_path / "pytorch_model.bin")
    with raises(f"real momentum file {tmp_path / 'pytorch_model.bin'} {WEIGHTS_REFUSED}"):
        load_real_samples([tmp_path / "pytorch_model.bin"], [(16, 48)])


def test_each_momentum_mark_is_accepted(tmp_path):
    tensors = {"w": torch.randn(16, 48)}
    marked = tmp_path / "marked.safetensors"
    save_file(tensors, str(marked), metadata=MOMENTUM_METADATA)
    named = tmp_path / "step7.momentum.safetensors"
    save_file(tensors, str(named))
    unmarked = tmp_path / "plain.safetensors"
    save_file(tensors, str(unmarked))
    for path in (marked, named):
        assert len(load_real_samples([path], [(16, 48)])[(16, 48)]) == 1
    assert len(load_real_samples([unmarked], [(16, 48)], is_momentum=True)[(16, 48)]) == 1


def test_harvest_files_are_momentum(tmp_path):
    path = tmp_path / "recorded.safetensors"
    save_file({"mlp.up.step4": torch.randn(16, 48)}, str(path), metadata={"format": HARVEST_FORMAT})
    assert HARVEST_FORMAT.startswith(HARVEST_FORMAT_PREFIX)
    assert len(load_real_samples([path], [(16, 48)])[(16, 48)]) == 1


def test_a_text_file_is_named_as_not_a_tensor_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("i\n" * 200)  # "i" is byte 105: torch's unpickler used to report just "105"
    message = "not a safetensors or torch file (accepted: *.safetensors, or *.pt / *.pth / *.bin written by"
    with raises(f"cannot read real momentum file {path}: {message} torch.save)"):
        load_real_samples([path], [(16, 48)])


def test_folder_without_momentum_files(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with raises(f"no momentum files (*.safetensors, *.pt, *.pth, *.bin) under folder {tmp_path}"):
        validate_real_paths([tmp_path])


# --- ratio, counts, split ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"), [("1:3", (1, 3)), ("0:1", (0, 1)), ("1:0", (1, 0)), ("10:6", (10, 6))]
)
def test_parse_ratio(text, expected):
    assert parse_ratio(text) == expected


@pytest.mark.parametrize("text", ["1:0:3", "0:0", "-1:3", "a:b", "13", "1.5:2", "", "1:"])
def test_parse_ratio_names_the_bad_value(text):
    with raises(f"invalid ratio '{text}': expected R:S with two non-negative integers, not both 0, e.g. 1:3"):
        parse_ratio(text)


@pytest.mark.parametrize(
    ("total", "ratio", "expected"),
    [
        (16, (1, 3), (4, 12)),
        (16, "1:3", (4, 12)),
        (3, (1, 3), (1, 2)),  # quotas 0.75 : 2.25 — the larger remainder is real's
        (5, (1, 1), (3, 2)),  # a tie goes to real
        (8, (1, 15), (1, 7)),  # at least one real once total >= 2
        (8, (15, 1), (7, 1)),  # and at least one synthetic
        (1, (1, 3), (0, 1)),
        (6, (1, 0), (6, 0)),
        (6, (0, 1), (0, 6)),
        (0, (1, 3), (0, 0)),
    ],
)
def test_split_counts(total, ratio, expected):
    assert split_counts(total, ratio) == expected


def test_split_counts_errors():
    with raises("sample count must be a non-negative integer, got -1"):
        split_counts(-1, (1, 3))
    with raises("invalid ratio '0:0'"):
        split_counts(4, (0, 0))
    with raises("invalid ratio '-1:3'"):
        split_counts(4, (-1, 3))


def tiny(kind: str, index: int) -> Sample:
    return Sample(matrix=torch.full((2, 3), float(index)), kind=kind, source=f"{kind}:{index}")


def mixed(n_real: int, n_synthetic: int) -> list[Sample]:
    real = [tiny("real", i) for i in range(n_real)]
    return real + [tiny("synthetic", n_real + i) for i in range(n_synthetic)]


def kinds(samples: list[Sample]) -> list[str]:
    return [s.kind for s in samples]


def test_split_is_stratified_disjoint_and_ordered():
    samples = mixed(4, 12)
    calibration, validation = train_validation_split(samples, 0.25, seed=0)
    assert kinds(validation).count("real") == 1 and kinds(validation).count("synthetic") == 3
    assert kinds(calibration).count("real") == 3 and kinds(calibration).count("synthetic") == 9
    sources = [s.source for s in samples]
    assert sorted(s.source for s in calibration + validation) == sorted(sources)
    for part in (calibration, validation):
        positions = [sources.index(s.source) for s in part]
        assert positions == sorted(positions)


def test_split_keeps_every_synthetic_family_in_calibration():
    # The default mix at 16 samples, 1:3: one gaussian, one heavy-tailed and one row/col-scaled sample
    # among 12 synthetic ones. A kind-only split at seed 0 validated on the first two and never fitted them.
    real = [tiny("real", i) for i in range(4)]
    synthetic = synthetic_samples((8, 24), 12, seed=0)
    families = {s.source for s in synthetic}
    for seed in range(5):
        calibration, validation = train_validation_split(real + synthetic, 0.25, seed=seed)
        assert {s.source for s in calibration if s.kind == "synthetic"} == families
        assert kinds(validation).count("synthetic") == 3 and kinds(validation).count("real") == 1
        # Validation draws from the families with samples to spare.
        assert {s.source for s in validation if s.kind == "synthetic"} == {"synthetic:low_rank_noise"}


def test_split_takes_a_familys_only_sample_when_nothing_else_can_validate():
    synthetic = synthetic_samples((8, 24), 2, seed=0, families=["gaussian", "heavy_tailed"])
    calibration, validation = train_validation_split(synthetic, 0.25, seed=0)
    assert len(calibration) == len(validation) == 1


def test_split_is_deterministic_per_seed():
    samples = mixed(8, 24)

    def validation_sources(seed: int) -> list[str]:
        return [s.source for s in train_validation_split(samples, seed=seed)[1]]

    assert validation_sources(1) == validation_sources(1)
    assert validation_sources(1) != validation_sources(2)


@pytest.mark.parametrize(
    ("n_real", "n_synthetic", "n_validation"), [(2, 2, 2), (1, 1, 1), (0, 2, 1), (1, 0, 0), (0, 0, 0)]
)
def test_split_keeps_both_sets_non_empty_where_possible(n_real, n_synthetic, n_validation):
    calibration, validation = train_validation_split(mixed(n_real, n_synthetic), 0.1, seed=0)
    assert len(validation) == n_validation
    assert len(calibration) == n_real + n_synthetic - n_validation
    if n_real and n_synthetic:
        assert "real" in kinds(calibration)


@pytest.mark.parametrize("fraction", [0, 1, -0.5, 1.5])
def test_split_rejects_bad_fraction(fraction):
    with raises(f"validation fraction must be between 0 and 1, got {fraction}"):
        train_validation_split(mixed(2, 2), fraction, seed=0)


def test_reject_non_finite_names_the_sample():
    good = tiny("synthetic", 0)
    bad = Sample(matrix=torch.tensor([[1.0, float("inf")]]), kind="real", source="file:/x.pt:w")
    assert reject_non_finite([good]) == [good]
    with raises("sample file:/x.pt:w contains NaN or Inf"):
        reject_non_finite([good, bad])
