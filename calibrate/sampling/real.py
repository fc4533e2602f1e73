"""Real momentum from user files: optimizer checkpoints, harvest files, tensors marked as momentum.

Real momentum is what a Muon-family optimizer actually feeds Newton–Schulz, so it is the sample the fit
most needs (docs/design.md §1: raw momentum is nearly low-rank, unlike any noise model). Tensors are
matched to the requested shapes by canonical (min, max) key, so a stored (11008, 4096) matrix serves
4096x11008.

A plain tensor cannot say whether it is momentum or a weight (a Hugging Face checkpoint holds weights of
exactly the model's shapes), and fitting to weights silently gives wrong coefficients. So a file counts
as momentum only when it says so: an optimizer state_dict (its ``momentum_buffer`` / ``exp_avg``), a
``root-calibrate harvest`` file, a safetensors file with metadata ``{"root_calibrate": "momentum"}``, a
file named ``*.momentum.<ext>``, or any file when the caller passes ``is_momentum=True``
(``--real-is-momentum``). Any other file is refused, with the ways to mark it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from root_core.recording import is_recording
from root_core.tables import canonical_shape

from ..errors import CalibrationError
from .base import Sample
from .recorded import rotate_within_steps, samples_from_recording

Shape = tuple[int, int]
PathLike = str | Path

# Files a folder is searched for (recursively); a file named directly is read whatever its suffix.
LOADABLE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
# Optimizer-state keys that hold first-moment momentum: SGD/Muon's buffer and Adam's exp_avg. Adam's
# exp_avg_sq is a second moment, not a direction, and is never a sample.
MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")
# The marks that make plain tensors momentum (see the module docstring).
MOMENTUM_METADATA = {"root_calibrate": "momentum"}
MOMENTUM_NAME_SUFFIX = ".momentum"  # layers.momentum.safetensors, step100.momentum.pt
# Metadata "format" of files the harvester writes (sampling/harvest.py HARVEST_FORMAT, repeated here
# because harvest.py imports the training stack; tests/test_sampling.py checks the two agree).
HARVEST_FORMAT_PREFIX = "root-calibrate-harvest/"
# First bytes of what torch.save writes: a zip archive (torch ≥ 1.6) or a legacy pickle (protocol 2+).
TORCH_MAGIC = (b"PK\x03\x04", b"\x80")
# How torch.load(weights_only=True) starts its message when the file holds more than tensors (or is junk).
WEIGHTS_ONLY_FAILURE = "Weights only load failed"
# Longest reason quoted from a loader's exception, so the error stays one line.
MAX_REASON_CHARS = 160


def _as_path(path: PathLike) -> Path:
    return Path(path).expanduser()


def _loadable_files(folder: Path) -> list[Path]:
    """Momentum files under ``folder``, sorted so the sample order (and so the fit) is reproducible."""
    found = (p for p in folder.rglob("*") if p.suffix.lower() in LOADABLE_SUFFIXES and p.is_file())
    return sorted(found)


def _no_files_error(folder: Path) -> CalibrationError:
    kinds = ", ".join(f"*{suffix}" for suffix in LOADABLE_SUFFIXES)
    return CalibrationError(f"no momentum files ({kinds}) under folder {folder}")


def validate_real_paths(paths: Sequence[PathLike]) -> None:
    """Fail fast, before any long work, on a path that does not exist, cannot be read, or holds no files."""
    for raw in paths:
        path = _as_path(raw)
        if not path.exists():
            raise CalibrationError(f"real momentum path does not exist: {path}")
        if path.is_dir():
            if not os.access(path, os.R_OK | os.X_OK):
                raise CalibrationError(f"real momentum folder is not readable: {path}")
            if not _loadable_files(path):
                raise _no_files_error(path)
        elif path.is_file():
            if not os.access(path, os.R_OK):
                raise CalibrationError(f"real momentum file is not readable: {path}")
        else:
            raise CalibrationError(f"real momentum path is neither a file nor a folder: {path}")


def _short_reason(error: BaseException) -> str:
    if str(error).startswith(WEIGHTS_ONLY_FAILURE) and error.__context__ is not None:
        # torch wraps the real cause ("Unsupported global: ...") in a long paragraph about weights_only;
        # its first sentence is what the user needs.
        cause = str(error.__context__).split(". ")[0]
        return f"only tensors and dicts of tensors can be loaded safely ({cause})"
    lines = str(error).strip().splitlines()
    reason = lines[0] if lines else type(error).__name__
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 1] + "…"


def _tensor_metadata(metadata: Mapping[str, str], key: str) -> dict[str, Any]:
    """Per-tensor info the harvester stores as ``{"<tensor name>": "<JSON object>"}``."""
    raw = metadata.get(key)
    if raw is None:
        return {}
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError:
        return {"metadata": raw}
    return parsed if isinstance(parsed, dict) else {"metadata": parsed}


def matrix_key(dims: Sequence[int]) -> Shape | None:
    """Canonical key of a tensor's matrix view: 2-D as is, conv (out, in, kh, kw) as (out, in·kh·kw)."""
    if len(dims) not in (2, 4) or 0 in dims:
        return None
    return canonical_shape((dims[0], math.prod(dims[1:])))


def _named_momentum(path: Path) -> bool:
    return Path(path.stem).name.lower().endswith(MOMENTUM_NAME_SUFFIX)


def _marked_momentum(metadata: Mapping[str, str]) -> bool:
    marked = all(metadata.get(key) == value for key, value in MOMENTUM_METADATA.items())
    return marked or str(metadata.get("format", "")).startswith(HARVEST_FORMAT_PREFIX)


def not_momentum_error(path: Path, flag: str | None) -> CalibrationError:
    """One line: why ``path`` is refused and every way to mark it as momentum."""
    marks = (
        'safetensors metadata {"root_calibrate": "momentum"}, a *.momentum.safetensors / *.momentum.pt '
        "name, an optimizer state_dict (momentum_buffer / exp_avg) or a `root-calibrate harvest` file"
    )
    hint = f", or pass {flag}" if flag else ""
    return CalibrationError(
        f"real momentum file {path} holds plain tensors not marked as momentum (model weights look the "
        f"same); mark momentum with {marks}{hint}"
    )


def _read_safetensors(
    path: Path, wanted: set[Shape], is_momentum: bool, flag: str | None
) -> Iterator[tuple[str, Tensor, dict[str, Any]]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        metadata = handle.metadata() or {}
        if not (is_momentum or _named_momentum(path) or _marked_momentum(metadata)):
            raise not_momentum_error(path, flag)
        keys = list(handle.keys())
        file_level = {k: v for k, v in metadata.items() if k not in keys}
        for key in keys:
            # The header gives every shape, so tensors of other shapes are never read.
            if matrix_key(handle.get_slice(key).get_shape()) not in wanted:
                continue
            meta = _tensor_metadata(metadata, key)
            if file_level:
                meta["file_metadata"] = file_level
            yield key, handle.get_tensor(key), meta


def _join(prefix: str, key: object) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _is_optimizer_state(obj: object) -> bool:
    return isinstance(obj, Mapping) and isinstance(obj.get("state"), Mapping) and "param_groups" in obj


def _param_names(state_dict: Mapping[str, Any]) -> dict[object, str]:
    """Parameter id → name, where the optimizer was built from named parameters (torch ≥ 2.6 stores them)."""
    names: dict[object, str] = {}
    for group in state_dict.get("param_groups") or []:
        if isinstance(group, Mapping) and "param_names" in group:
            names.update(zip(group.get("params", []), group["param_names"], strict=False))
    return names


def _optimizer_momentum(state_dict: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, Tensor, dict]]:
    names = _param_names(state_dict)
    for param_id, state in state_dict["state"].items():
        if not isinstance(state, Mapping):
            continue
        for key in MOMENTUM_KEYS:
            if isinstance(state.get(key), Tensor):
                meta: dict[str, Any] = {"state_key": key}
                if param_id in names:
                    meta["param_name"] = names[param_id]
                yield _join(prefix, f"state.{param_id}.{key}"), state[key], meta


def _walk(obj: object, prefix: str, plain: list, momentum: list) -> None:
    """Collect tensors from a loaded object: optimizer momentum apart from every other tensor."""
    if isinstance(obj, Tensor):
        plain.append((prefix, obj, {}))
    elif _is_optimizer_state(obj):
        momentum.extend(_optimizer_momentum(obj, prefix))
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            _walk(value, _join(prefix, key), plain, momentum)
    elif isinstance(obj, list | tuple):
        for index, value in enumerate(obj):
            _walk(value, _join(prefix, index), plain, momentum)


def _read_torch(path: Path, is_momentum: bool, flag: str | None) -> list[tuple[str, Tensor, dict[str, Any]]]:
    loaded = torch.load(path, weights_only=True, map_location="cpu")
    plain: list = []
    momentum: list = []
    _walk(loaded, "", plain, momentum)
    # A file holding an optimizer state is a training checkpoint: its other tensors are weights, not
    # momentum, and would match the same shapes.
    if _contains_optimizer_state(loaded):
        return momentum
    if not (is_momentum or _named_momentum(path)):
        raise not_momentum_error(path, flag)
    return plain


def _contains_optimizer_state(obj: object) -> bool:
    if _is_optimizer_state(obj):
        return True
    if isinstance(obj, Mapping):
        return any(_contains_optimizer_state(value) for value in obj.values())
    if isinstance(obj, list | tuple):
        return any(_contains_optimizer_state(value) for value in obj)
    return False


def _file_kind(path: Path) -> str | None:
    """ "safetensors", "torch", or None when the first bytes are neither (a text file, say)."""
    if path.suffix.lower() == ".safetensors":
        return "safetensors"  # a damaged one gets the safetensors loader's own reason
    with path.open("rb") as stream:
        head = stream.read(9)
    if head.startswith(TORCH_MAGIC):
        return "torch"
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    return "safetensors" if len(head) == 9 and head[8:9] == b"{" else None


def read_tensors(
    path: Path, wanted: set[Shape], is_momentum: bool, flag: str | None
) -> list[tuple[str, Tensor, dict[str, Any]]]:
    """(key, tensor, meta) for the candidate tensors in ``path`` whose matrix shape is in ``wanted``
    (safetensors; a torch file lists all); a bare tensor has the key "". Any failure is one line."""
    try:
        kind = _file_kind(path)
        if kind is None:
            raise CalibrationError(
                f"cannot read real momentum file {path}: not a safetensors or torch file (accepted: "
                "*.safetensors, or *.pt / *.pth / *.bin written by torch.save)"
            )
        if kind == "safetensors":
            return list(_read_safetensors(path, wanted, is_momentum, flag))
        return _read_torch(path, is_momentum, flag)
    except CalibrationError:
        raise
    except Exception as error:  # any loader failure is the user's file, reported in one line
        raise CalibrationError(f"cannot read real momentum file {path}: {_short_reason(error)}") from None


def _as_matrix(tensor: Tensor, wanted: set[Shape]) -> Tensor | None:
    """The 2-D view of a floating tensor whose matrix shape is wanted, else None."""
    if not tensor.is_floating_point() or matrix_key(tensor.shape) not in wanted:
        return None
    return tensor.reshape(tensor.shape[0], -1)


def _source(path: Path, key: str) -> str:
    return f"file:{path}:{key}" if key else f"file:{path}"


def _samples_from_file(
    path: Path, wanted: set[Shape], is_momentum: bool, flag: str | None
) -> Iterator[tuple[Shape, Sample]]:
    for key, tensor, extra in read_tensors(path, wanted, is_momentum, flag):
        matrix = _as_matrix(tensor, wanted)
        if matrix is None:
            continue
        source = _source(path, key)
        if not bool(torch.isfinite(matrix).all()):
            raise CalibrationError(
                f"real momentum {source.removeprefix('file:')} contains NaN or Inf; remove it from the file"
            )
        meta = {**extra, "file": str(path), "key": key, "stored_shape": list(tensor.shape)}
        sample = Sample(matrix=matrix, kind="real", source=source, meta=meta)
        yield sample.shape, sample


def momentum_files(paths: Sequence[PathLike]) -> list[Path]:
    """The files ``--real`` reads: each file named, and the loadable files under each folder, sorted."""
    files: list[Path] = []
    for raw in paths:
        path = _as_path(raw)
        files.extend(_loadable_files(path) if path.is_dir() else [path])
    return files


def _canonical_shapes(shapes: Sequence[Sequence[int]]) -> list[Shape]:
    keys: list[Shape] = []
    for shape in shapes:
        try:
            key = canonical_shape(shape)
        except ValueError as error:
            raise CalibrationError(str(error)) from None
        if key not in keys:
            keys.append(key)
    return keys


def load_real_samples(
    paths: Sequence[PathLike],
    shapes: Sequence[Sequence[int]],
    *,
    is_momentum: bool = False,
    flag: str | None = None,
    recorded_matrices: bool = True,
) -> dict[Shape, list[Sample]]:
    """Real momentum samples per canonical shape, from files and folders (searched recursively).

    ROOT's recordings (root_core/recording.py) give a spectrum-only sample per recorded matrix and step
    (:class:`~calibrate.sampling.recorded.SpectrumSample`), or, where the whole update was recorded and
    ``recorded_matrices`` is true, a matrix sample instead; sources read ``file:<recording>:<key>@step<N>``.

    A file not marked as momentum (module docstring) is refused unless ``is_momentum``; ``flag`` is the
    command-line option the refusal names as the way to override it.

    Every requested shape is a key, with an empty list where no tensor matched. Sources read
    ``file:<path>:<tensor key>`` (nested dict keys joined by "."; an optimizer state's
    ``state.<id>.momentum_buffer``); ``meta`` holds the harvester's per-tensor metadata, where present.
    A matching tensor with NaN or Inf is an error naming it, never silently dropped.
    """
    validate_real_paths(paths)
    keys = _canonical_shapes(shapes)
    found: dict[Shape, list[Sample]] = {key: [] for key in keys}
    for path in momentum_files(paths):
        if is_recording(path):  # ROOT's own recording: spectra, and whole updates where recorded
            pairs = samples_from_recording(path, set(keys), matrices=recorded_matrices)
        else:
            pairs = _samples_from_file(path, set(keys), is_momentum, flag)
        for key, sample in pairs:
            found[key].append(sample)
    return {key: rotate_within_steps(samples) for key, samples in found.items()}
