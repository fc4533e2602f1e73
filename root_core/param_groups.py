"""Which parameters ROOT orthogonalises and which get AdamW, decided by what each module is.

Muon-family training (KellerJordan/Muon, Moonlight, modded-nanogpt) orthogonalises the hidden matrices
only. Lookup tables (embeddings) and the output head map between tokens and features rather than
features to features, and vectors (norm gains, biases) have no matrix to orthogonalise, so all of them
get AdamW. Names are no guide: a BERT layer's ``attention.output.dense`` and ``output.dense`` are hidden
matrices, while a GPT-2 head may be nothing but the embedding matrix used twice. So the split looks at
module types and tensor identity instead.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["DEFAULT_ADAMW_LR", "output_head_of", "root_param_groups"]

# AdamW's peak lr in LLaMA's 7B/13B pretraining (Touvron et al. 2023, arXiv 2302.13971, table 2), the
# usual starting point for transformer embeddings and heads. Pass adamw_lr=None for the optimizer's lr.
DEFAULT_ADAMW_LR = 3e-4
EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


def root_param_groups(
    model: nn.Module,
    *,
    adamw_lr: float | None = DEFAULT_ADAMW_LR,
    adamw_weight_decay: float | None = None,
    decay_vectors: bool = False,
    output_head: str | nn.Module | None = None,
    vocab_size: int | None = None,
    named: bool = False,
) -> list[dict[str, Any]]:
    """Parameter groups for :class:`root_core.ROOT`: hidden matrices, then the AdamW groups.

    * ROOT (``use_root=True``): every matrix (2-D or more: Linear and Conv weights, fused projections)
      that is neither an embedding nor the output head.
    * AdamW (``use_root=False``), lr ``adamw_lr`` (default :data:`DEFAULT_ADAMW_LR`; ``None`` takes the
      optimizer's lr), weight decay ``adamw_weight_decay`` (``None``: the optimizer's): the weights of
      ``nn.Embedding``/``nn.EmbeddingBag`` modules and the output head's matrices.
    * AdamW without weight decay: vectors (norm gains, biases, any 0-/1-D parameter); with
      ``decay_vectors=True`` they join the previous group instead.

    The output head is ``output_head`` (a submodule or its qualified name, e.g. ``"lm_head"``); else the
    ``nn.Linear`` whose weight is an embedding's weight (tied, as GPT-2 and BERT do); else the last
    ``nn.Linear``, in registration order, whose ``out_features`` is the vocabulary size: ``vocab_size``,
    or the ``num_embeddings`` of the largest ``nn.Embedding``. A model with none of these (a vision
    classifier) has no head unless named. Frozen parameters are left out, tied ones listed once, and
    empty groups dropped.

    ``named=True`` lists ``(name, parameter)`` pairs, as ``model.named_parameters()`` names them; torch
    keeps the names in each group's ``param_names`` and ROOT's recordings (``record_dir=``) use them.
    """
    embeddings = [m for m in model.modules() if isinstance(m, EMBEDDINGS)]
    head = output_head_of(model, output_head=output_head, vocab_size=vocab_size)
    lookups = {id(m.weight) for m in embeddings}
    if head is not None:
        lookups |= {id(p) for p in head.parameters() if p.ndim >= 2}
    hidden: list[Tensor] = []
    tables: list[Tensor] = []
    vectors: list[Tensor] = []
    for p in model.parameters():  # each shared (tied) parameter once
        if not p.requires_grad:
            continue
        if id(p) in lookups:
            tables.append(p)
        elif p.ndim < 2:
            vectors.append(p)
        else:
            hidden.append(p)
    adamw: dict[str, Any] = {"use_root": False}
    if adamw_lr is not None:
        adamw["lr"] = adamw_lr
    if adamw_weight_decay is not None:
        adamw["weight_decay"] = adamw_weight_decay
    if decay_vectors:
        groups = [{"params": hidden, "use_root": True}, {"params": tables + vectors, **adamw}]
    else:
        groups = [
            {"params": hidden, "use_root": True},
            {"params": tables, **adamw},
            {"params": vectors, **adamw, "weight_decay": 0.0},
        ]
    groups = [g for g in groups if g["params"]]
    if named:
        names = {id(p): name for name, p in model.named_parameters()}
        for group in groups:
            group["params"] = [(names[id(p)], p) for p in group["params"]]
    return groups


def output_head_of(
    model: nn.Module, *, output_head: str | nn.Module | None = None, vocab_size: int | None = None
) -> nn.Module | None:
    """The module :func:`root_param_groups` treats as the output head (see there), or None."""
    if output_head is not None:
        return _named_head(model, output_head)
    if vocab_size is not None and (
        isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1
    ):
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    embeddings = [m for m in model.modules() if isinstance(m, EMBEDDINGS)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    tied = {id(m.weight) for m in embeddings}
    for linear in linears:
        if id(linear.weight) in tied:
            return linear
    vocab = vocab_size
    if vocab is None:
        vocab = max((m.num_embeddings for m in embeddings if isinstance(m, nn.Embedding)), default=None)
    matches = [m for m in linears if m.out_features == vocab]
    if vocab_size is not None and not matches:
        raise ValueError(
            f"vocab_size={vocab_size} matches no nn.Linear's out_features and no nn.Linear is tied to an "
            "embedding; name the head with output_head="
        )
    return matches[-1] if matches else None


def _named_head(model: nn.Module, output_head: str | nn.Module) -> nn.Module:
    if isinstance(output_head, str):
        try:
            head = model.get_submodule(output_head)
        except AttributeError:
            raise ValueError(f"output_head {output_head!r} is not a submodule of this model") from None
    elif isinstance(output_head, nn.Module):
        head = output_head
        if not any(m is head for m in model.modules()):
            raise ValueError(f"output_head {type(head).__name__} is not a submodule of this model")
    else:
        raise ValueError(f"output_head must be a submodule or its name, got {output_head!r}")
    if not any(p.ndim >= 2 for p in head.parameters()):
        named = output_head if isinstance(output_head, str) else type(head).__name__
        raise ValueError(f"output_head {named!r} has no weight matrix")
    return head
