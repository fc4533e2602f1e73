"""root_param_groups routes by module type and tensor identity, on LLaMA-, GPT-2- and BERT-like trees."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from root_core import ROOT, root_param_groups
from root_core.param_groups import DEFAULT_ADAMW_LR, output_head_of

pytestmark = pytest.mark.filterwarnings("ignore::root_core.tables.MissingShapeWarning")

VOCAB, DIM, FF = 40, 8, 16


def ns(**children: nn.Module) -> nn.Module:
    """A plain container, so the trees below carry Hugging Face's qualified names."""
    module = nn.Module()
    for name, child in children.items():
        module.add_module(name, child)
    return module


def llama_like() -> nn.Module:
    layer = ns(
        self_attn=ns(**{f"{x}_proj": nn.Linear(DIM, DIM, bias=False) for x in "qkvo"}),
        mlp=ns(
            gate_proj=nn.Linear(DIM, FF, bias=False),
            up_proj=nn.Linear(DIM, FF, bias=False),
            down_proj=nn.Linear(FF, DIM, bias=False),
        ),
        input_layernorm=nn.RMSNorm(DIM),
        post_attention_layernorm=nn.RMSNorm(DIM),
    )
    model = ns(embed_tokens=nn.Embedding(VOCAB, DIM), layers=nn.ModuleList([layer]), norm=nn.RMSNorm(DIM))
    return ns(model=model, lm_head=nn.Linear(DIM, VOCAB, bias=False))


class Conv1D(nn.Module):
    """GPT-2's fused projection: a (in, out) weight, not an nn.Linear."""

    def __init__(self, nx: int, nf: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


def gpt2_like() -> nn.Module:
    block = ns(
        ln_1=nn.LayerNorm(DIM),
        attn=ns(c_attn=Conv1D(DIM, 3 * DIM), c_proj=Conv1D(DIM, DIM)),
        ln_2=nn.LayerNorm(DIM),
        mlp=ns(c_fc=Conv1D(DIM, FF), c_proj=Conv1D(FF, DIM)),
    )
    transformer = ns(
        wte=nn.Embedding(VOCAB, DIM),
        wpe=nn.Embedding(12, DIM),
        h=nn.ModuleList([block]),
        ln_f=nn.LayerNorm(DIM),
    )
    model = ns(transformer=transformer, lm_head=nn.Linear(DIM, VOCAB, bias=False))
    model.lm_head.weight = transformer.wte.weight  # tied, as GPT2LMHeadModel.tie_weights does
    return model


def bert_like() -> nn.Module:
    layer = ns(
        attention=ns(
            self=ns(query=nn.Linear(DIM, DIM), key=nn.Linear(DIM, DIM), value=nn.Linear(DIM, DIM)),
            output=ns(dense=nn.Linear(DIM, DIM), LayerNorm=nn.LayerNorm(DIM)),
        ),
        intermediate=ns(dense=nn.Linear(DIM, FF)),
        output=ns(dense=nn.Linear(FF, DIM), LayerNorm=nn.LayerNorm(DIM)),
    )
    embeddings = ns(
        word_embeddings=nn.Embedding(VOCAB, DIM),
        position_embeddings=nn.Embedding(12, DIM),
        token_type_embeddings=nn.Embedding(2, DIM),
        LayerNorm=nn.LayerNorm(DIM),
    )
    bert = ns(
        embeddings=embeddings, encoder=ns(layer=nn.ModuleList([layer])), pooler=ns(dense=nn.Linear(DIM, DIM))
    )
    predictions = ns(transform=ns(dense=nn.Linear(DIM, DIM), LayerNorm=nn.LayerNorm(DIM)))
    predictions.decoder = nn.Linear(DIM, VOCAB)
    predictions.decoder.weight = embeddings.word_embeddings.weight  # tied, as BertForMaskedLM does
    return ns(bert=bert, cls=ns(predictions=predictions))


def routes(model: nn.Module, **kwargs) -> dict[str, str]:
    """Each parameter's name → "root", "adamw" (embeddings, head) or "vector" (AdamW, no decay)."""
    names = {id(p): name for name, p in model.named_parameters()}
    out = {}
    for group in root_param_groups(model, **kwargs):
        kind = "root" if group["use_root"] else "vector" if group.get("weight_decay") == 0.0 else "adamw"
        for p in group["params"]:
            assert names[id(p)] not in out, f"{names[id(p)]} is in two groups"
            out[names[id(p)]] = kind
    assert sorted(out) == sorted(names.values()), "every trainable parameter exactly once"
    return out


def names_of(table: dict[str, str], kind: str) -> set[str]:
    return {name for name, k in table.items() if k == kind}


def test_llama_hidden_matrices_to_root_embedding_and_untied_head_to_adamw():
    table = routes(llama_like())
    layer = "model.layers.0"
    assert names_of(table, "root") == {f"{layer}.self_attn.{x}_proj.weight" for x in "qkvo"} | {
        f"{layer}.mlp.{x}_proj.weight" for x in ("gate", "up", "down")
    }
    assert names_of(table, "adamw") == {"model.embed_tokens.weight", "lm_head.weight"}
    assert names_of(table, "vector") == {
        f"{layer}.input_layernorm.weight",
        f"{layer}.post_attention_layernorm.weight",
        "model.norm.weight",
    }


def test_gpt2_fused_conv1d_to_root_tied_head_listed_once():
    model = gpt2_like()
    table = routes(model)
    assert names_of(table, "root") == {
        f"transformer.h.0.{x}.weight" for x in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    # lm_head.weight *is* wte.weight: named once, under the name torch lists first.
    assert names_of(table, "adamw") == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert output_head_of(model) is model.lm_head
    assert "transformer.h.0.attn.c_attn.bias" in names_of(table, "vector")


def test_bert_attention_output_and_ffn_output_are_hidden_matrices():
    model = bert_like()
    table = routes(model)
    layer = "bert.encoder.layer.0"
    assert names_of(table, "root") == {
        f"{layer}.attention.self.query.weight",
        f"{layer}.attention.self.key.weight",
        f"{layer}.attention.self.value.weight",
        f"{layer}.attention.output.dense.weight",
        f"{layer}.intermediate.dense.weight",
        f"{layer}.output.dense.weight",
        "bert.pooler.dense.weight",
        "cls.predictions.transform.dense.weight",
    }
    embeddings = "bert.embeddings"
    assert names_of(table, "adamw") == {
        f"{embeddings}.{x}_embeddings.weight" for x in ("word", "position", "token_type")
    }
    assert output_head_of(model) is model.cls.predictions.decoder  # tied, so not picked by vocabulary size
    assert "cls.predictions.decoder.bias" in names_of(table, "vector")
    assert f"{layer}.attention.output.LayerNorm.weight" in names_of(table, "vector")


def test_untied_head_is_the_last_linear_with_the_vocabulary_size():
    model = nn.Sequential(
        nn.Embedding(VOCAB, DIM),
        nn.Linear(DIM, VOCAB),  # a hidden layer that happens to be VOCAB wide: still ROOT
        nn.Linear(VOCAB, DIM),
        nn.Linear(DIM, VOCAB, bias=False),
    )
    table = routes(model)
    assert names_of(table, "root") == {"1.weight", "2.weight"}
    assert names_of(table, "adamw") == {"0.weight", "3.weight"}
    # A vocabulary the embeddings do not show: say it; or name the head.
    assert names_of(routes(model, vocab_size=DIM), "adamw") == {"0.weight", "2.weight"}
    assert names_of(routes(model, output_head="1"), "adamw") == {"0.weight", "1.weight"}
    assert names_of(routes(model, output_head=model[2]), "adamw") == {"0.weight", "2.weight"}


def test_a_classifier_without_embeddings_has_a_head_only_when_named():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 8), nn.Linear(8, 10))
    assert names_of(routes(model), "root") == {"0.weight", "2.weight", "3.weight"}
    assert names_of(routes(model, output_head="3"), "adamw") == {"3.weight"}


def test_embedding_bags_go_to_adamw():
    model = nn.Sequential(nn.EmbeddingBag(VOCAB, DIM), nn.Linear(DIM, DIM))
    assert routes(model) == {"0.weight": "adamw", "1.weight": "root", "1.bias": "vector"}


def test_group_settings_lr_weight_decay_and_frozen_parameters():
    model = llama_like()
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    hidden, lookups, vectors = root_param_groups(model)
    assert hidden == {"params": hidden["params"], "use_root": True} and len(hidden["params"]) == 6
    assert lookups == {"params": lookups["params"], "use_root": False, "lr": DEFAULT_ADAMW_LR}
    assert vectors == {
        "params": vectors["params"],
        "use_root": False,
        "lr": DEFAULT_ADAMW_LR,
        "weight_decay": 0.0,
    }
    # Options: the optimizer's lr, a set weight decay, and vectors decayed with the lookup tables.
    hidden, adamw = root_param_groups(model, adamw_lr=None, adamw_weight_decay=0.05, decay_vectors=True)
    assert adamw == {"params": adamw["params"], "use_root": False, "weight_decay": 0.05}
    assert len(adamw["params"]) == 2 + 3
    assert [g["lr"] for g in ROOT(root_param_groups(model, adamw_lr=None), lr=0.02).param_groups] == [
        0.02
    ] * 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(output_head="lm_heads"), "output_head 'lm_heads' is not a submodule of this model"),
        (dict(output_head=nn.Linear(2, 2)), "output_head Linear is not a submodule of this model"),
        (dict(output_head="model.norm"), "output_head 'model.norm' has no weight matrix"),
        (dict(output_head=3), "output_head must be a submodule or its name, got 3"),
        (dict(vocab_size=0), "vocab_size must be a positive integer, got 0"),
        (dict(vocab_size=7), "vocab_size=7 matches no nn.Linear's out_features"),
    ],
)
def test_bad_head_settings_are_refused_with_one_line(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        root_param_groups(llama_like(), **kwargs)


def test_root_steps_every_group_of_a_tied_model():
    torch.manual_seed(0)
    model = gpt2_like()
    optimizer = ROOT(root_param_groups(model), lr=0.02, table="muon")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    assert all(not torch.equal(p, before[name]) for name, p in model.named_parameters())
