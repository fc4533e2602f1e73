"""Stage 1 of root-calibrate: --shapes parsing, architecture presets, HF config.json, and their union."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from calibrate.errors import CalibrationError
from calibrate.shapes import (
    ARCHITECTURES,
    LayerShape,
    architecture_shapes,
    format_shape,
    parse_shapes,
    resolve_shapes,
    shapes_from_config,
)

# The four shapes of the ROOT paper's reference model (Llama-3.2-1B with fused QKV and gate-up).
ROOT_PAPER_KEYS = {(2048, 2048), (2048, 3072), (2048, 8192), (2048, 16384)}

LLAMA_DICT = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "num_hidden_layers": 16,
}
GPT2_DICT = {"model_type": "gpt2", "n_embd": 768, "n_head": 12, "n_inner": None, "n_layer": 12}

SHAPE_HINT = "expected MxN with positive integers, e.g. 4096x11008"


def keys(layers: list[LayerShape]) -> set[tuple[int, int]]:
    return {layer.key for layer in layers}


def by_name(layers: list[LayerShape]) -> dict[str, tuple[int, int]]:
    return {layer.name: layer.shape for layer in layers}


# --- parse_shapes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096x11008,1024x4096", [(4096, 11008), (1024, 4096)]),
        ("11008x4096", [(4096, 11008)]),
        ("4096x11008 , 11008X4096,1024×4096", [(4096, 11008), (1024, 4096)]),
        ("  2048x2048  ", [(2048, 2048)]),
        ("5x3,3x5,5x3", [(3, 5)]),
        ("7x1,2x9,1x7", [(1, 7), (2, 9)]),
    ],
)
def test_parse_shapes_canonical_unique_ordered(text: str, expected: list[tuple[int, int]]) -> None:
    assert parse_shapes(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("4096x", f"invalid shape '4096x': {SHAPE_HINT}"),
        ("0x5", f"invalid shape '0x5': {SHAPE_HINT}"),
        ("abc", f"invalid shape 'abc': {SHAPE_HINT}"),
        ("4096x11008x2", f"invalid shape '4096x11008x2': {SHAPE_HINT}"),
        ("-3x4", f"invalid shape '-3x4': {SHAPE_HINT}"),
        ("1024x4096, 4096x", f"invalid shape '4096x': {SHAPE_HINT}"),
        ("", "invalid --shapes '': expected a comma-separated list of MxN, e.g. 4096x11008,1024x4096"),
        ("   ", "invalid --shapes '   ': expected a comma-separated list of MxN, e.g. 4096x11008,1024x4096"),
        (
            "4096x11008,",
            "invalid --shapes '4096x11008,': empty item at position 2; expected MxN, e.g. 4096x11008",
        ),
        ("1x2,,3x4", "invalid --shapes '1x2,,3x4': empty item at position 2; expected MxN, e.g. 4096x11008"),
    ],
)
def test_parse_shapes_rejects_with_exact_message(text: str, message: str) -> None:
    with pytest.raises(CalibrationError, match=f"^{re.escape(message)}$"):
        parse_shapes(text)


def test_format_shape_round_trips() -> None:
    assert format_shape((2048, 8192)) == "2048x8192"
    assert parse_shapes(",".join(format_shape(k) for k in [(1, 2), (3, 4)])) == [(1, 2), (3, 4)]


# --- presets -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # q/o 2048x2048, k/v 512x2048, gate/up/down 2048↔8192; fused qkv 3072x2048, fused gate-up 16384x2048.
        ("llama-3.2-1b", {(2048, 2048), (512, 2048), (2048, 8192), (2048, 3072), (2048, 16384)}),
        # 32 kv heads: q/k/v/o all 4096x4096.
        ("llama-2-7b", {(4096, 4096), (4096, 11008)}),
        # k/v 8 heads x 128 = 1024.
        ("llama-3-8b", {(4096, 4096), (1024, 4096), (4096, 14336)}),
        # k/v 2 heads x 64 = 128.
        ("qwen2.5-0.5b", {(896, 896), (128, 896), (896, 4864)}),
        # c_attn 2304x768, c_proj 768x768, c_fc / mlp c_proj 768↔3072.
        ("gpt2", {(768, 2304), (768, 768), (768, 3072)}),
    ],
)
def test_preset_keys(name: str, expected: set[tuple[int, int]]) -> None:
    assert keys(architecture_shapes(name)) == expected


def test_llama_3_2_1b_has_root_paper_shapes_in_both_layouts() -> None:
    layers = architecture_shapes("llama-3.2-1b")
    assert keys(layers) >= ROOT_PAPER_KEYS
    names = [layer.name for layer in layers]
    assert len(names) == len(set(names)), "o_proj / down_proj are shared by both layouts, listed once"
    assert by_name(layers)["self_attn.qkv_proj (fused)"] == (3072, 2048)
    assert by_name(layers)["mlp.gate_up_proj (fused)"] == (16384, 2048)
    assert by_name(layers)["self_attn.k_proj"] == (512, 2048)
    assert all(layer.count == 16 for layer in layers)


def test_every_preset_resolves() -> None:
    for name in ARCHITECTURES:
        assert architecture_shapes(name)


def test_unknown_architecture_lists_known_names() -> None:
    known = ", ".join(sorted(ARCHITECTURES))
    message = f"unknown architecture 'llama-9': expected one of {known}"
    with pytest.raises(CalibrationError, match=f"^{re.escape(message)}$"):
        architecture_shapes("llama-9")


# --- shapes_from_config ------------------------------------------------------------------------------------


def test_config_dict_unfused_by_default() -> None:
    layers = shapes_from_config(LLAMA_DICT)
    assert by_name(layers) == {
        "self_attn.q_proj": (2048, 2048),
        "self_attn.k_proj": (512, 2048),
        "self_attn.v_proj": (512, 2048),
        "self_attn.o_proj": (2048, 2048),
        "mlp.gate_proj": (8192, 2048),
        "mlp.up_proj": (8192, 2048),
        "mlp.down_proj": (2048, 8192),
    }
    assert {layer.count for layer in layers} == {16}


def test_config_fused_flags() -> None:
    qkv_only = by_name(shapes_from_config(LLAMA_DICT, fused_qkv=True))
    assert qkv_only["self_attn.qkv_proj (fused)"] == (3072, 2048)
    assert "self_attn.q_proj" not in qkv_only and "mlp.gate_proj" in qkv_only
    both = shapes_from_config(LLAMA_DICT, fused_qkv=True, fused_gate_up=True)
    assert keys(both) == ROOT_PAPER_KEYS
    assert by_name(both)["mlp.gate_up_proj (fused)"] == (16384, 2048)


def test_config_says_fused() -> None:
    assert "self_attn.qkv_proj (fused)" in by_name(shapes_from_config({**LLAMA_DICT, "fused_qkv": True}))
    phi3 = by_name(shapes_from_config({**LLAMA_DICT, "model_type": "phi3"}))
    assert {"self_attn.qkv_proj (fused)", "mlp.gate_up_proj (fused)"} <= set(phi3)
    # An explicit argument wins over the config.
    assert "self_attn.q_proj" in by_name(
        shapes_from_config({**LLAMA_DICT, "fused_qkv": True}, fused_qkv=False)
    )


def test_config_defaults_for_kv_heads_and_head_dim() -> None:
    config = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_hidden_layers": 2}
    assert by_name(shapes_from_config({**config, "num_key_value_heads": None}))["self_attn.k_proj"] == (
        64,
        64,
    )
    # Explicit head_dim need not equal hidden / heads (as in Gemma-style configs).
    assert by_name(shapes_from_config({**config, "head_dim": 32}))["self_attn.q_proj"] == (128, 64)


def test_config_file_and_folder(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(ARCHITECTURES["llama-3-8b"]), encoding="utf-8")
    expected = {(4096, 4096), (1024, 4096), (4096, 14336)}
    assert keys(shapes_from_config(path)) == expected
    assert keys(shapes_from_config(str(path))) == expected
    assert keys(shapes_from_config(tmp_path)) == expected


def test_gpt2_config() -> None:
    layers = shapes_from_config(GPT2_DICT)
    assert by_name(layers) == {
        "attn.c_attn (fused)": (2304, 768),
        "attn.c_proj": (768, 768),
        "mlp.c_fc": (3072, 768),
        "mlp.c_proj": (768, 3072),
    }
    # Keys alone identify GPT-2 even without model_type; n_inner overrides the 4x default.
    custom = {"n_embd": 64, "n_head": 4, "n_inner": 100, "n_layer": 3}
    assert by_name(shapes_from_config(custom))["mlp.c_fc"] == (100, 64)
    split = by_name(shapes_from_config(GPT2_DICT, fused_qkv=False))
    assert split["attn.c_attn[k]"] == (768, 768) and "attn.c_attn (fused)" not in split


@pytest.mark.parametrize(
    ("change", "message"),
    [
        # A null value counts as missing (HF configs write null for "use the default").
        ({"intermediate_size": None}, "config: missing key 'intermediate_size'; expected a positive integer"),
        ({"hidden_size": 0}, "config: invalid 'hidden_size' = 0; expected a positive integer"),
        (
            {"num_hidden_layers": "16"},
            "config: invalid 'num_hidden_layers' = '16'; expected a positive integer",
        ),
        (
            {"num_attention_heads": True},
            "config: invalid 'num_attention_heads' = True; expected a positive integer",
        ),
        ({"fused_qkv": "yes"}, "config: invalid 'fused_qkv' = 'yes'; expected true or false"),
        (
            {"num_key_value_heads": 5},
            "config: 'num_key_value_heads' = 5 does not divide 'num_attention_heads' = 32",
        ),
        (
            {"num_attention_heads": 3, "head_dim": None},
            "config: 'hidden_size' = 2048 is not divisible by 'num_attention_heads' = 3; "
            "give 'head_dim' explicitly",
        ),
    ],
)
def test_config_dict_errors(change: dict, message: str) -> None:
    with pytest.raises(CalibrationError, match=f"^{re.escape(message)}$"):
        shapes_from_config({**LLAMA_DICT, **change})


def test_config_dict_absent_key() -> None:
    config = {key: value for key, value in LLAMA_DICT.items() if key != "num_hidden_layers"}
    message = "config: missing key 'num_hidden_layers'; expected a positive integer"
    with pytest.raises(CalibrationError, match=f"^{re.escape(message)}$"):
        shapes_from_config(config)


def test_config_file_missing_key_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"n_embd": 768, "n_head": 12}), encoding="utf-8")
    message = f"config '{path}': missing key 'n_layer'; expected a positive integer"
    with pytest.raises(CalibrationError, match=f"^{re.escape(message)}$"):
        shapes_from_config(path)


def test_config_file_bad_json(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"hidden_size": 2048,', encoding="utf-8")
    message = f"invalid JSON in config '{path}': Expecting property name enclosed in double quotes at line 1"
    with pytest.raises(CalibrationError, match=f"^{re.escape(message)}"):
        shapes_from_config(path)


def test_config_file_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(
        CalibrationError, match=re.escape(f"invalid config '{path}': expected a JSON object, got list")
    ):
        shapes_from_config(path)


def test_config_file_missing(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    message = f"cannot read config '{path}': No such file or directory; expected a readable config.json"
    with pytest.raises(CalibrationError, match=f"^{re.escape(message)}$"):
        shapes_from_config(path)


# --- resolve_shapes ----------------------------------------------------------------------------------------


def test_resolve_shapes_union_in_order(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(GPT2_DICT), encoding="utf-8")
    resolved, layers = resolve_shapes("8192x2048, 7x5", "llama-2-7b", path)
    assert resolved == [
        (2048, 8192),
        (5, 7),
        (4096, 4096),
        (4096, 11008),
        (768, 2304),
        (768, 768),
        (768, 3072),
    ]
    assert layers is not None
    assert [layer.name for layer in layers][-1] == "mlp.c_proj"


def test_resolve_shapes_merges_duplicates_across_sources() -> None:
    resolved, _ = resolve_shapes("4096x4096,11008x4096", "llama-2-7b", None)
    assert resolved == [(4096, 4096), (4096, 11008)]


def test_resolve_shapes_only_typed_shapes_has_no_layers() -> None:
    assert resolve_shapes("4x2", None, None) == ([(2, 4)], None)


def test_resolve_shapes_needs_one_source() -> None:
    with pytest.raises(CalibrationError, match=r"^give at least one of --shapes, --arch or --config$"):
        resolve_shapes(None, None, None)


def test_resolve_shapes_passes_errors_through() -> None:
    with pytest.raises(CalibrationError, match=re.escape(f"invalid shape '4096x': {SHAPE_HINT}")):
        resolve_shapes("4096x", None, None)
    with pytest.raises(CalibrationError, match=re.escape("unknown architecture 'nope'")):
        resolve_shapes(None, "nope", None)
