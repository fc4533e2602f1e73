"""Stage 1 of ``root-calibrate``: which matrix shapes to calibrate.

Three sources, combined by :func:`resolve_shapes` (the CLI's ``--shapes``, ``--arch`` and ``--config``):

- ``"4096x11008,1024x4096"`` typed by the user (:func:`parse_shapes`);
- a built-in architecture preset (:data:`ARCHITECTURES`, :func:`architecture_shapes`);
- a Hugging Face-style ``config.json`` (:func:`shapes_from_config`), so a user can regenerate tables for a
  new architecture without writing any code.

Every shape ends as a canonical table key ``(min, max)`` (``root_core.tables.canonical_shape``): Newton–Schulz
runs on the wide orientation, so a matrix and its transpose share one set of coefficients.

Only the hidden weight matrices are listed. Embeddings and the LM head are left out on purpose: ROOT routes
them (and every non-matrix parameter) to AdamW, so no coefficients are ever looked up for them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calibrate.errors import CalibrationError
from root_core.tables import canonical_shape

ShapeKey = tuple[int, int]

SHAPE_EXAMPLE = "4096x11008"
SHAPES_EXAMPLE = "4096x11008,1024x4096"
# "x", "X" and the multiplication sign "×" all separate the two dimensions; spaces around them are allowed.
_SHAPE_RE = re.compile(r"\s*([0-9]+)\s*[xX×]\s*([0-9]+)\s*", re.ASCII)
_ITEM_SEPARATOR = ","

# A directory given as --config is a checkpoint folder; Hugging Face keeps the config under this name.
CONFIG_FILENAME = "config.json"

# Non-standard boolean keys a config may carry to say its checkpoint stores fused matrices.
FUSED_QKV_KEY = "fused_qkv"
FUSED_GATE_UP_KEY = "fused_gate_up"
# Model types whose Hugging Face modules store q/k/v and gate/up as one matrix each (Phi-3: qkv_proj and
# gate_up_proj). GPT-2's c_attn is fused too, but GPT-2 has its own key set, handled separately.
FUSED_QKV_MODEL_TYPES = frozenset({"phi3"})
FUSED_GATE_UP_MODEL_TYPES = frozenset({"phi3"})
GPT2_MODEL_TYPES = frozenset({"gpt2"})
# GPT-2 leaves n_inner null and uses this multiple of n_embd for the MLP.
GPT2_MLP_RATIO = 4

# Preset-only key (not part of any Hugging Face config): the layouts whose shapes a preset yields.
PRESET_VARIANTS_KEY = "variants"
UNFUSED = "unfused"
FUSED = "fused"
_VARIANT_FLAGS: dict[str, tuple[bool, bool]] = {UNFUSED: (False, False), FUSED: (True, True)}


@dataclass(frozen=True)
class LayerShape:
    """One kind of hidden weight matrix of a model.

    ``shape`` is ``(out, in)`` as in an ``nn.Linear`` weight; ``count`` is how many such matrices the whole
    model holds (per layer × number of layers). GPT-2's ``Conv1D`` stores the transpose, which does not
    matter here because the table key is orientation-free.
    """

    name: str
    shape: tuple[int, int]
    count: int

    def __post_init__(self) -> None:
        if len(self.shape) != 2 or not all(_is_positive_int(d) for d in self.shape):
            raise CalibrationError(
                f"invalid shape {self.shape!r} for layer {self.name!r}: expected two positive integers"
            )
        if not _is_positive_int(self.count):
            raise CalibrationError(
                f"invalid count {self.count!r} for layer {self.name!r}: expected a positive integer"
            )

    @property
    def key(self) -> ShapeKey:
        """The canonical table key ``(min, max)``."""
        return canonical_shape(self.shape)


# ---------------------------------------------------------------------------------------------------------
# --shapes
# ---------------------------------------------------------------------------------------------------------


def parse_shapes(text: str) -> list[ShapeKey]:
    """``"4096x11008, 1024X4096"`` → ``[(4096, 11008), (1024, 4096)]``.

    Keys are canonical ``(min, max)``; duplicates in either orientation merge, first appearance wins.
    """
    if not text.strip():
        raise CalibrationError(
            f"invalid --shapes {text!r}: expected a comma-separated list of MxN, e.g. {SHAPES_EXAMPLE}"
        )
    keys = []
    for position, raw in enumerate(text.split(_ITEM_SEPARATOR), start=1):
        keys.append(_parse_item(raw.strip(), text, position))
    return unique_keys(keys)


def _parse_item(item: str, text: str, position: int) -> ShapeKey:
    if not item:
        # A trailing or doubled comma is almost always a typo; naming the position finds it.
        raise CalibrationError(
            f"invalid --shapes {text!r}: empty item at position {position}; "
            f"expected MxN, e.g. {SHAPE_EXAMPLE}"
        )
    match = _SHAPE_RE.fullmatch(item)
    if match is None or int(match[1]) < 1 or int(match[2]) < 1:
        raise CalibrationError(
            f"invalid shape {item!r}: expected MxN with positive integers, e.g. {SHAPE_EXAMPLE}"
        )
    return canonical_shape((int(match[1]), int(match[2])))


def format_shape(key: Sequence[int]) -> str:
    """``(2048, 8192)`` → ``"2048x8192"``, the form ``--shapes`` accepts back."""
    first, second = key
    return f"{first}x{second}"


def unique_keys(keys: Iterable[Sequence[int]]) -> list[ShapeKey]:
    """Canonical keys with duplicates (in either orientation) merged, order of first appearance kept."""
    return list(dict.fromkeys(canonical_shape(key) for key in keys))


# ---------------------------------------------------------------------------------------------------------
# --config
# ---------------------------------------------------------------------------------------------------------


def shapes_from_config(
    config: Mapping[str, Any] | str | Path,
    *,
    fused_qkv: bool | None = None,
    fused_gate_up: bool | None = None,
) -> list[LayerShape]:
    """Every hidden weight-matrix shape of a Hugging Face-style config (dict, file or checkpoint folder).

    LLaMA/Qwen/Mistral keys (``hidden_size``, ``intermediate_size``, ``num_attention_heads``,
    ``num_key_value_heads``, ``head_dim``, ``num_hidden_layers``) and GPT-2 keys (``n_embd``, ``n_head``,
    ``n_inner``, ``n_layer``) are understood. ``fused_qkv`` / ``fused_gate_up`` choose one fused matrix
    instead of q/k/v or gate/up; ``None`` follows the config (unfused unless it says otherwise). GPT-2 has
    no gate, so ``fused_gate_up`` does not apply to it. Embeddings and the LM head are not listed: ROOT
    hands them to AdamW.
    """
    source, data = _load_config(config)
    if _is_gpt2(data):
        return _gpt2_shapes(data, source, fused_qkv=fused_qkv)
    if fused_qkv is None:
        fused_qkv = _config_says_fused(data, source, FUSED_QKV_KEY, FUSED_QKV_MODEL_TYPES)
    if fused_gate_up is None:
        fused_gate_up = _config_says_fused(data, source, FUSED_GATE_UP_KEY, FUSED_GATE_UP_MODEL_TYPES)
    return _llama_shapes(data, source, fused_qkv=fused_qkv, fused_gate_up=fused_gate_up)


def _load_config(config: Mapping[str, Any] | str | Path) -> tuple[str, Mapping[str, Any]]:
    """``(source, data)``; ``source`` names the file (or "config" for a dict) in every later error."""
    if isinstance(config, Mapping):
        return "config", config
    path = Path(config)
    if path.is_dir():
        path = path / CONFIG_FILENAME
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CalibrationError(
            f"cannot read config '{path}': {reason}; expected a readable config.json"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CalibrationError(
            f"invalid JSON in config '{path}': {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    if not isinstance(data, dict):
        raise CalibrationError(f"invalid config '{path}': expected a JSON object, got {type(data).__name__}")
    return f"config '{path}'", data


def _is_gpt2(data: Mapping[str, Any]) -> bool:
    return data.get("model_type") in GPT2_MODEL_TYPES or ("n_embd" in data and "hidden_size" not in data)


def _config_says_fused(data: Mapping[str, Any], source: str, key: str, model_types: frozenset[str]) -> bool:
    if key in data:
        value = data[key]
        if not isinstance(value, bool):
            raise CalibrationError(f"{source}: invalid {key!r} = {value!r}; expected true or false")
        return value
    return data.get("model_type") in model_types


def _positive_int(data: Mapping[str, Any], source: str, key: str, default: int | None = None) -> int:
    """``data[key]`` as a positive int; a missing or null key takes ``default`` when there is one."""
    value = data.get(key)
    if value is None:
        if default is not None:
            return default
        raise CalibrationError(f"{source}: missing key {key!r}; expected a positive integer")
    if not _is_positive_int(value):
        raise CalibrationError(f"{source}: invalid {key!r} = {value!r}; expected a positive integer")
    return value


def _llama_shapes(
    data: Mapping[str, Any], source: str, *, fused_qkv: bool, fused_gate_up: bool
) -> list[LayerShape]:
    hidden = _positive_int(data, source, "hidden_size")
    intermediate = _positive_int(data, source, "intermediate_size")
    heads = _positive_int(data, source, "num_attention_heads")
    kv_heads = _positive_int(data, source, "num_key_value_heads", default=heads)
    layers = _positive_int(data, source, "num_hidden_layers")
    if data.get("head_dim") is None and hidden % heads:
        raise CalibrationError(
            f"{source}: 'hidden_size' = {hidden} is not divisible by 'num_attention_heads' = {heads}; "
            "give 'head_dim' explicitly"
        )
    head_dim = _positive_int(data, source, "head_dim", default=hidden // heads)
    if heads % kv_heads:
        # Grouped-query attention shares each k/v head among a whole number of query heads.
        raise CalibrationError(
            f"{source}: 'num_key_value_heads' = {kv_heads} does not divide 'num_attention_heads' = {heads}"
        )

    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    if fused_qkv:
        attention = [LayerShape("self_attn.qkv_proj (fused)", (q_out + 2 * kv_out, hidden), layers)]
    else:
        attention = [
            LayerShape("self_attn.q_proj", (q_out, hidden), layers),
            LayerShape("self_attn.k_proj", (kv_out, hidden), layers),
            LayerShape("self_attn.v_proj", (kv_out, hidden), layers),
        ]
    attention.append(LayerShape("self_attn.o_proj", (hidden, q_out), layers))
    if fused_gate_up:
        mlp = [LayerShape("mlp.gate_up_proj (fused)", (2 * intermediate, hidden), layers)]
    else:
        mlp = [
            LayerShape("mlp.gate_proj", (intermediate, hidden), layers),
            LayerShape("mlp.up_proj", (intermediate, hidden), layers),
        ]
    mlp.append(LayerShape("mlp.down_proj", (hidden, intermediate), layers))
    return attention + mlp


def _gpt2_shapes(data: Mapping[str, Any], source: str, *, fused_qkv: bool | None) -> list[LayerShape]:
    embed = _positive_int(data, source, "n_embd")
    heads = _positive_int(data, source, "n_head")
    inner = _positive_int(data, source, "n_inner", default=GPT2_MLP_RATIO * embed)
    layers = _positive_int(data, source, "n_layer")
    if embed % heads:
        raise CalibrationError(f"{source}: 'n_embd' = {embed} is not divisible by 'n_head' = {heads}")

    # GPT-2 checkpoints store c_attn fused, so that is the default; False lists its three thirds instead.
    if fused_qkv is None or fused_qkv:
        attention = [LayerShape("attn.c_attn (fused)", (3 * embed, embed), layers)]
    else:
        attention = [LayerShape(f"attn.c_attn[{part}]", (embed, embed), layers) for part in "qkv"]
    return [
        *attention,
        LayerShape("attn.c_proj", (embed, embed), layers),
        LayerShape("mlp.c_fc", (inner, embed), layers),
        LayerShape("mlp.c_proj", (embed, inner), layers),
    ]


# ---------------------------------------------------------------------------------------------------------
# --arch
# ---------------------------------------------------------------------------------------------------------

# Config dicts copied (shape-relevant keys only) from the public Hugging Face config.json of each model.
# vocab_size is kept for reference only: embeddings and the LM head go to AdamW and are never calibrated.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    # Source: meta-llama/Llama-3.2-1B. The ROOT paper's reference model. Its reference code fuses q/k/v into
    # one 3072x2048 matrix and gate/up into one 16384x2048 matrix, while Hugging Face checkpoints keep them
    # apart, so the preset yields the shapes of both layouts.
    "llama-3.2-1b": {
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "num_hidden_layers": 16,
        "vocab_size": 128256,
        PRESET_VARIANTS_KEY: [UNFUSED, FUSED],
    },
    # Source: meta-llama/Llama-2-7b-hf (no grouped-query attention: 32 kv heads).
    "llama-2-7b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "num_hidden_layers": 32,
        "vocab_size": 32000,
    },
    # Source: meta-llama/Meta-Llama-3-8B (head_dim 128 = 4096 / 32, derived).
    "llama-3-8b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_hidden_layers": 32,
        "vocab_size": 128256,
    },
    # Source: Qwen/Qwen2.5-0.5B (head_dim 64 = 896 / 14, derived).
    "qwen2.5-0.5b": {
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "num_hidden_layers": 24,
        "vocab_size": 151936,
    },
    # Source: openai-community/gpt2 (n_inner null → 4 * n_embd).
    "gpt2": {
        "model_type": "gpt2",
        "n_embd": 768,
        "n_head": 12,
        "n_inner": None,
        "n_layer": 12,
        "vocab_size": 50257,
    },
}


def architecture_shapes(name: str) -> list[LayerShape]:
    """The hidden weight-matrix shapes of a built-in preset.

    A preset with several ``variants`` (layouts) yields the shapes of each, each matrix once; its counts then
    describe each layout, not one model holding all of them.
    """
    preset = ARCHITECTURES.get(name)
    if preset is None:
        known = ", ".join(sorted(ARCHITECTURES))
        raise CalibrationError(f"unknown architecture {name!r}: expected one of {known}")
    variants = preset.get(PRESET_VARIANTS_KEY)
    if variants is None:
        return shapes_from_config(preset)
    layers: dict[tuple[str, tuple[int, int]], LayerShape] = {}
    for variant in variants:
        fused_qkv, fused_gate_up = _VARIANT_FLAGS[variant]
        for layer in shapes_from_config(preset, fused_qkv=fused_qkv, fused_gate_up=fused_gate_up):
            layers.setdefault((layer.name, layer.shape), layer)
    return list(layers.values())


# ---------------------------------------------------------------------------------------------------------
# The three CLI options together
# ---------------------------------------------------------------------------------------------------------


def resolve_shapes(
    shapes: str | None, arch: str | None, config: str | Path | None
) -> tuple[list[ShapeKey], list[LayerShape] | None]:
    """Union of ``--shapes``, ``--arch`` and ``--config`` as unique canonical keys (in that order).

    The second item lists the named layers behind the keys when ``--arch`` or ``--config`` was given (for
    reports), else ``None``.
    """
    if shapes is None and arch is None and config is None:
        raise CalibrationError("give at least one of --shapes, --arch or --config")
    keys = parse_shapes(shapes) if shapes is not None else []
    layers: list[LayerShape] | None = None
    if arch is not None or config is not None:
        layers = []
        if arch is not None:
            layers.extend(architecture_shapes(arch))
        if config is not None:
            layers.extend(shapes_from_config(config))
    return unique_keys([*keys, *(layer.key for layer in layers or [])]), layers


def _is_positive_int(value: object) -> bool:
    # bool is an int subclass, but `"hidden_size": true` is a broken config, not a size of 1.
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
