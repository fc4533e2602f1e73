"""Recording what Newton–Schulz sees during training, for calibrating on the user's own momentum.

Every ``every`` steps, :class:`MomentumRecorder` keeps, for each ROOT-routed matrix, the float64 singular
values of the clipped update B that Newton–Schulz receives (before NS divides it by its norm), and for a
chosen subset of parameters the whole update before the clip (so a calibration can clip it again at any
quantile; ``clip(update, clip_quantile)`` is B bit for bit). Spectra are what a calibration needs: NS acts
on singular values only (docs/design.md §1.1), so ``root-calibrate --real DIR`` fits on them directly.

Each recorded step becomes one file per rank, ``step{step:08d}.rank{rank}.safetensors``, written
atomically (:func:`root_core.files.write_atomically`): a crash leaves the old files and no half one. The
format is safetensors (an 8-byte little-endian header length, a JSON header, raw little-endian bytes),
written here without the ``safetensors`` package so ``root_core`` keeps depending on torch alone:

* tensors ``sigma:<parameter name>`` (float64, descending, length min(m, n)) and, for the chosen
  parameters, ``update:<parameter name>`` (the update's dtype, shape (m, n) as ROOT orthogonalises it);
* metadata ``format`` (:data:`RECORDING_FORMAT`), ``root_calibrate: momentum`` (so any reader of momentum
  files takes the updates as momentum), ``step``, ``rank``, ``table`` ("name@version"), ``table_hash``
  and ``entries``: a JSON list of ``{"name", "shape", "clip_quantile"}``, one per recorded matrix.

Under data parallelism (:mod:`root_core.distributed`) only the rank that orthogonalises a matrix sees its
whole update, so each matrix is recorded once, by its owner, with no extra collective; file names carry
the rank. The spectrum is one float64 Gram product of the short side and its ``eigvalsh`` (as
``calibrate/spectra.py``, docs/design.md §1.2), once per ``every`` steps.
"""

from __future__ import annotations

import ctypes
import fnmatch
import json
import math
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
import torch.distributed as dist
from torch import Tensor

from .files import write_atomically

__all__ = [
    "RECORDING_FORMAT",
    "MomentumRecorder",
    "RecordedMatrix",
    "RecordedSpectrum",
    "RecordingError",
    "read_recorded_matrices",
    "read_recordings",
    "recording_files",
    "singular_values",
]

RECORDING_FORMAT = "root-momentum-recording/1"
SPECTRUM_PREFIX = "sigma:"
UPDATE_PREFIX = "update:"
RECORDING_SUFFIX = ".safetensors"
# safetensors' dtype names for what a recording holds (float64 spectra, updates in the parameter dtype).
_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
}
_DTYPE_NAMES = {name: dtype for dtype, name in _DTYPES.items()}
# A recording header holds a few hundred bytes per matrix; more than this is not a recording.
MAX_HEADER_BYTES = 100 * 1024 * 1024
DEFAULT_RECORD_EVERY = 100


class RecordingError(ValueError):
    """A recording that cannot be read, or a recorder that cannot write: one line naming the file."""


@dataclass(frozen=True)
class RecordedSpectrum:
    """One matrix's spectrum at one step: what its Newton–Schulz call received."""

    step: int
    name: str
    shape: tuple[int, int]
    singular_values: Tensor  # float64, descending, of the clipped update B, before NS's normalisation
    clip_quantile: float | None
    table: str  # "name@version"
    table_hash: str
    rank: int
    file: str | None = None  # the recording it was read from; None for a recorder's own in-memory list


@dataclass(frozen=True)
class RecordedMatrix:
    """One recorded whole update (before the clip): ``clip_to_quantile(update, clip_quantile)`` is B."""

    step: int
    name: str
    shape: tuple[int, int]
    update: Tensor
    clip_quantile: float | None
    table: str
    table_hash: str
    rank: int
    file: str | None = None


def singular_values(B: Tensor) -> Tensor:
    """σ of ``B`` (shape ``(..., m, n)``), float64, descending, on ``B``'s device.

    The float64 Gram matrix of the short side and its ``eigvalsh``, square-rooted: the method of
    ``calibrate/spectra.py`` (11 s against 30 s for ``svdvals`` at 4096×11008, agreeing to 1e-13,
    docs/design.md §1.2), without its normalisation, so ‖B‖_F² = Σσ² stays in the record.
    """
    B = B.detach().to(torch.float64)
    if B.shape[-2] > B.shape[-1]:
        B = B.mT
    eigenvalues = torch.linalg.eigvalsh(B @ B.mT).clamp(min=0.0)
    return eigenvalues.sqrt().flip(-1)


class MomentumRecorder:
    """Records the spectra (and chosen whole updates) that ROOT's Newton–Schulz receives.

    Args:
        directory: where the recordings go; created if missing. Not writable → :class:`RecordingError`
            at construction, naming it.
        every: record on steps 1, every + 1, 2·every + 1, … (the first step, so early training is in).
        matrices: parameter names (``fnmatch`` patterns: ``"layers.0.*"``) whose whole update is saved
            too; the rest get spectra only.

    Give it to ROOT as ``ROOT(..., recorder=MomentumRecorder(...))`` or let ROOT make one with
    ``record_dir=``/``record_every=``/``record_matrices=``. :meth:`spectra` lists what this process
    recorded so far (kept in memory: min(m, n) float64 values per matrix and recorded step).
    """

    def __init__(
        self, directory: str | os.PathLike, every: int = DEFAULT_RECORD_EVERY, matrices: Iterable[str] = ()
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"record_every must be an integer ≥ 1, got {every!r}")
        if isinstance(matrices, str):
            matrices = (matrices,)
        self.directory = Path(directory).expanduser()
        self.every = every
        self.matrices = tuple(matrices)
        self.step = 0  # optimizer steps seen (ROOT calls begin_step once per step)
        self._recording = False
        self._pending: list[tuple[RecordedSpectrum, Tensor | None]] = []
        self._spectra: list[RecordedSpectrum] = []
        self.files: list[Path] = []  # what this process wrote, in order
        check_writable(self.directory)

    # ---- what ROOT calls ------------------------------------------------------------------------------

    # The three methods ROOT calls run eagerly under torch.compile: they keep Python state (the step count)
    # and write files, which Dynamo cannot trace (it fails on the file name's format). A compiled step
    # breaks its graph around them; with recording off ROOT never calls them.
    @torch.compiler.disable
    def begin_step(self) -> bool:
        """Count a step; whether its matrices are recorded."""
        self.step += 1
        self._recording = (self.step - 1) % self.every == 0
        self._pending = []  # a step that raised before end_step left its records unwritten: drop them
        return self._recording

    @torch.compiler.disable
    def observe(
        self,
        names: Sequence[str],
        update: Tensor,
        clipped: Tensor,
        *,
        clip_quantile: float | None,
        table: str,
        table_hash: str,
    ) -> None:
        """Record matrices of one NS call: ``update`` and ``clipped`` (= B) are (m, n) or (b, m, n)."""
        if not self._recording:
            return
        if clipped.ndim == 2:
            update, clipped = update.unsqueeze(0), clipped.unsqueeze(0)
        sigma = singular_values(clipped).cpu()
        rank = _rank()
        for index, name in enumerate(names):
            record = RecordedSpectrum(
                step=self.step,
                name=name,
                shape=(int(clipped.shape[-2]), int(clipped.shape[-1])),
                singular_values=sigma[index].clone(),
                clip_quantile=clip_quantile,
                table=table,
                table_hash=table_hash,
                rank=rank,
            )
            whole = update[index].detach().cpu().clone() if self._wants_matrix(name) else None
            self._pending.append((record, whole))

    @torch.compiler.disable
    def end_step(self) -> Path | None:
        """Write this step's recordings (one file for this rank), if any; the file's path."""
        self._recording = False
        if not self._pending:
            return None
        pending, self._pending = self._pending, []
        path = self.directory / recording_name(pending[0][0].step, pending[0][0].rank)
        write_recording(path, pending)
        self._spectra.extend(record for record, _ in pending)
        self.files.append(path)
        return path

    # ---- for users and the online recalibration ------------------------------------------------------

    def spectra(self) -> list[RecordedSpectrum]:
        """Everything this process recorded so far, in recording order."""
        return list(self._spectra)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])

    def _wants_matrix(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.matrices)

    def __repr__(self) -> str:
        return f"MomentumRecorder({str(self.directory)!r}, every={self.every}, matrices={self.matrices!r})"


def check_writable(directory: Path) -> None:
    """Create ``directory`` and prove a file can be written there, or raise one line naming it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise RecordingError(
            f"record_dir {str(directory)!r} is not writable: {error.strerror or error}"
        ) from None


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def recording_name(step: int, rank: int) -> str:
    return f"step{step:08d}.rank{rank}{RECORDING_SUFFIX}"


# ---- the file format ---------------------------------------------------------------------------------


def write_recording(path: Path, records: Sequence[tuple[RecordedSpectrum, Tensor | None]]) -> Path:
    """One step's records as a safetensors file, atomically (see the module docstring for the layout)."""
    first = records[0][0]
    tensors: list[tuple[str, Tensor]] = []
    entries = []
    for record, whole in records:
        tensors.append((SPECTRUM_PREFIX + record.name, record.singular_values.to(torch.float64)))
        if whole is not None:
            tensors.append((UPDATE_PREFIX + record.name, whole))
        entries.append(
            {"name": record.name, "shape": list(record.shape), "clip_quantile": record.clip_quantile}
        )
    metadata = {
        "format": RECORDING_FORMAT,
        "root_calibrate": "momentum",
        "step": str(first.step),
        "rank": str(first.rank),
        "table": first.table,
        "table_hash": first.table_hash,
        "entries": json.dumps(entries),
    }
    return write_atomically(path, lambda stream: write_safetensors(stream, tensors, metadata))


def write_safetensors(
    stream: BinaryIO, tensors: Sequence[tuple[str, Tensor]], metadata: dict[str, str]
) -> None:
    """The safetensors layout: u64 little-endian header size, JSON header, then each tensor's raw bytes."""
    if sys.byteorder != "little":
        raise RecordingError(
            "recordings are written on little-endian machines only (safetensors' byte order)"
        )
    header: dict[str, Any] = {"__metadata__": metadata}
    contiguous = []
    offset = 0
    for name, tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        contiguous.append(tensor)
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # safetensors pads the header so the data starts 8-byte aligned
    stream.write(len(text).to_bytes(8, "little"))
    stream.write(text)
    for tensor in contiguous:
        if tensor.numel():
            # A view of the tensor's memory, not a copy (bytes(storage) copies element by element).
            stream.write(
                (ctypes.c_char * (tensor.numel() * tensor.element_size())).from_address(tensor.data_ptr())
            )


def recording_files(path: str | os.PathLike) -> list[Path]:
    """The recording files at ``path``: the file itself, or every ``*.safetensors`` under a folder, sorted."""
    path = Path(path).expanduser()
    if path.is_dir():
        return sorted(p for p in path.rglob(f"*{RECORDING_SUFFIX}") if p.is_file())
    if path.is_file():
        return [path]
    raise RecordingError(f"momentum recording path does not exist: {path}")


def is_recording(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a safetensors file whose metadata says it is a momentum recording."""
    try:
        header = _read_header(Path(path))[0]
    except (OSError, RecordingError):
        return False
    return (header.get("__metadata__") or {}).get("format") == RECORDING_FORMAT


def read_recordings(path: str | os.PathLike) -> list[RecordedSpectrum]:
    """Every recorded spectrum in a recording file, or in the recordings under a folder (sorted by file).

    Any file that is not a whole, valid recording raises one :class:`RecordingError` naming it.
    """
    return [spectrum for file in recording_files(path) for spectrum in _read_file(file)[0]]


def read_recorded_matrices(path: str | os.PathLike) -> list[RecordedMatrix]:
    """Every recorded whole update in a recording file or folder (see :func:`read_recordings`)."""
    return [matrix for file in recording_files(path) for matrix in _read_file(file)[1]]


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    size = path.stat().st_size
    with path.open("rb") as stream:
        prefix = stream.read(8)
        if len(prefix) < 8:
            raise RecordingError(f"cannot read momentum recording {path}: shorter than a safetensors header")
        length = int.from_bytes(prefix, "little")
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise RecordingError(
                f"cannot read momentum recording {path}: not a safetensors file (bad header size)"
            )
        try:
            header = json.loads(stream.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise RecordingError(f"cannot read momentum recording {path}: its header is not JSON") from None
    if not isinstance(header, dict):
        raise RecordingError(f"cannot read momentum recording {path}: its header is not a JSON object")
    return header, 8 + length


def _read_file(path: Path) -> tuple[list[RecordedSpectrum], list[RecordedMatrix]]:
    try:
        return _parse(path)
    except RecordingError:
        raise
    except (OSError, KeyError, TypeError, ValueError, RuntimeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise RecordingError(f"cannot read momentum recording {path}: {reason}") from None


def _parse(path: Path) -> tuple[list[RecordedSpectrum], list[RecordedMatrix]]:
    header, start = _read_header(path)
    metadata = header.pop("__metadata__", None) or {}
    if metadata.get("format") != RECORDING_FORMAT:
        raise RecordingError(
            f"cannot read momentum recording {path}: not a ROOT momentum recording (its metadata has no "
            f"format {RECORDING_FORMAT!r})"
        )
    data = path.read_bytes()[start:]
    step, rank = int(metadata["step"]), int(metadata["rank"])
    table, table_hash = metadata["table"], metadata["table_hash"]
    spectra, matrices = [], []
    for entry in json.loads(metadata["entries"]):
        name, shape, clip = entry["name"], tuple(int(d) for d in entry["shape"]), entry["clip_quantile"]
        common = dict(
            step=step,
            name=name,
            shape=shape,
            clip_quantile=clip,
            table=table,
            table_hash=table_hash,
            rank=rank,
            file=str(path),
        )
        sigma = _tensor(header, data, SPECTRUM_PREFIX + name, path)
        if (
            sigma.dtype != torch.float64
            or tuple(sigma.shape) != (min(shape),)
            or not bool(torch.isfinite(sigma).all())
        ):
            raise RecordingError(
                f"cannot read momentum recording {path}: spectrum of {name!r} is not {min(shape)} finite "
                "float64 values"
            )
        spectra.append(RecordedSpectrum(singular_values=sigma, **common))
        if UPDATE_PREFIX + name in header:
            update = _tensor(header, data, UPDATE_PREFIX + name, path)
            if tuple(update.shape) != shape:
                raise RecordingError(
                    f"cannot read momentum recording {path}: update of {name!r} is not {shape}"
                )
            matrices.append(RecordedMatrix(update=update, **common))
    return spectra, matrices


def _tensor(header: dict[str, Any], data: bytes, key: str, path: Path) -> Tensor:
    info = header.get(key)
    if not isinstance(info, dict):
        raise RecordingError(f"cannot read momentum recording {path}: tensor {key!r} is missing")
    dtype = _DTYPE_NAMES.get(info.get("dtype"))
    begin, end = info["data_offsets"]
    shape = [int(d) for d in info["shape"]]
    if dtype is None or not 0 <= begin <= end <= len(data):
        raise RecordingError(
            f"cannot read momentum recording {path}: tensor {key!r} is truncated or of unknown dtype"
        )
    count = math.prod(shape)
    if (end - begin) != count * torch.empty((), dtype=dtype).element_size():
        raise RecordingError(f"cannot read momentum recording {path}: tensor {key!r} has the wrong byte size")
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data[begin:end]), dtype=dtype).reshape(shape)
