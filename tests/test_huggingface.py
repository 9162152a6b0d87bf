"""Hugging Face model folders end to end: save_pretrained pairs, token data, the blocks preset,
held against plain transformers loops. Tiny models (a 2-block GPT-2 of width 32, a 2-layer BERT),
so the file stays fast."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from ckptscope import linear_path  # noqa: E402
from ckptscope.adapters.huggingface import blocks  # noqa: E402
from ckptscope.checkpoints import load_checkpoint  # noqa: E402
from ckptscope.errors import CkptscopeError  # noqa: E402
from ckptscope.results import open_result  # noqa: E402
from tests.conftest import run_cli as run  # noqa: E402

VOCAB = 50
ALPHAS = [0.0, 0.5, 1.0]


def _perturbed(model, seed: int, scale: float = 0.3):
    """The model's weights moved by seeded noise (a stand-in for fine-tuning)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * p.std().nan_to_num(0.02) * torch.randn(p.shape, generator=g))
    return model


def _gpt2(seed: int):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB,
                                     n_positions=32, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory):
    """Two save_pretrained folders (init, and a perturbed copy of it; the end also sharded),
    and held-out windows of 17 tokens."""
    root = tmp_path_factory.mktemp("gpt2")
    model = _gpt2(0)
    model.save_pretrained(root / "init")
    _perturbed(model, 1)
    model.save_pretrained(root / "final")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    rng = np.random.default_rng(0)
    np.save(root / "heldout.npy", rng.integers(0, VOCAB, (6, 17)))
    return root


def _lerp_states(start_dir, end_dir):
    a, b = load_checkpoint(start_dir).state, load_checkpoint(end_dir).state
    return a, b


def reference_lm(folder_cls, start_dir, end_dir, inputs, targets, alphas, moving=None):
    """A plain transformers loop: the model at lerp(start, end, alpha) (only ``moving`` keys
    move, the rest at the end), mean CE and accuracy over the targets that are not -100."""
    model = folder_cls.from_pretrained(str(start_dir)).eval()
    a, b = _lerp_states(start_dir, end_dir)
    out = []
    for alpha in alphas:
        state = {k: ((1 - alpha) * a[k] + alpha * b[k]) if (moving is None or moving(k))
                 else b[k] for k in a}
        model.load_state_dict(state, strict=False)  # the tied lm_head follows its embedding
        with torch.no_grad():
            logits = model(input_ids=inputs).logits
        flat, y = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        keep = y != -100
        loss = F.cross_entropy(flat[keep].double(), y[keep]).item()
        acc = (flat[keep].argmax(-1) == y[keep]).double().mean().item()
        out.append((loss, acc))
    return np.array(out)


def test_cli_path_on_save_pretrained_folders_matches_a_transformers_loop(gpt2_pair, capsys):
    root = gpt2_pair
    code, out, err = run(["path", root / "init", root / "final", "--data",
                          f"tokens:{root / 'heldout.npy'}", "--group", "transformer.h.0.",
                          "--alphas", "3", "--out", root / "r.nc"], capsys)
    assert code == 0, err
    ds = open_result(root / "r.nc")
    assert ds.attrs["adapter"] == "huggingface"
    windows = torch.as_tensor(np.load(root / "heldout.npy"))
    x, y = windows[:, :-1], windows[:, 1:]
    cls = transformers.GPT2LMHeadModel
    want = reference_lm(cls, root / "init", root / "final", x, y, ALPHAS)
    got = ds.sel(run=ds.run[0], split="test", group="all")
    np.testing.assert_allclose(got.loss.values, want[:, 0], rtol=1e-5)
    np.testing.assert_allclose(got.accuracy.values, want[:, 1], rtol=1e-5)
    want = reference_lm(cls, root / "init", root / "final", x, y, ALPHAS,
                        moving=lambda k: k.startswith("transformer.h.0."))
    got = ds.sel(run=ds.run[0], split="test", group="transformer.h.0.")
    np.testing.assert_allclose(got.loss.values, want[:, 0], rtol=1e-5)
    # the loss is not flat: the check above can fail
    assert np.ptp(ds.sel(group="all").loss.values) > 1e-3


def test_linear_path_sharded_folder_equals_the_single_file(gpt2_pair):
    root = gpt2_pair
    data = f"tokens:{root / 'heldout.npy'}"
    one = linear_path(root / "init", root / "final", data=data, alphas=ALPHAS)
    sharded = linear_path(root / "init", root / "sharded", data=data, alphas=ALPHAS)
    assert load_checkpoint(root / "sharded").sha256 != load_checkpoint(root / "final").sha256
    np.testing.assert_array_equal(one.loss.values, sharded.loss.values)
    # the index file itself is a checkpoint path too
    index = linear_path(root / "init", root / "sharded" / "model.safetensors.index.json",
                        data=data, alphas=ALPHAS, model="huggingface",
                        adapter_options={"model_dir": str(root / "init")})
    np.testing.assert_array_equal(one.loss.values, index.loss.values)


def test_blocks_preset_names_each_transformer_block():
    gpt2 = ["transformer.wte.weight", "transformer.h.0.ln_1.weight",
            "transformer.h.1.mlp.c_fc.bias", "transformer.h.10.attn.c_attn.weight",
            "lm_head.weight"]
    assert blocks(gpt2) == {"transformer.h.0": r"transformer\.h\.0\.",
                            "transformer.h.1": r"transformer\.h\.1\.",
                            "transformer.h.10": r"transformer\.h\.10\."}
    llama = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
             "model.layers.1.mlp.up_proj.weight"]
    assert list(blocks(llama)) == ["model.layers.0", "model.layers.1"]
    bert = ["bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.output.dense.weight",
            "roberta.encoder.layer.3.attention.self.query.bias"]
    assert list(blocks(bert)) == ["bert.encoder.layer.0", "roberta.encoder.layer.3"]
    with pytest.raises(CkptscopeError, match="preset 'blocks': no key looks like a transformer"):
        blocks(["conv1.weight", "fc.bias"])


def test_cli_preset_blocks_on_a_model_folder_needs_no_adapter(gpt2_pair, capsys):
    root = gpt2_pair
    code, out, err = run(["path", root / "init", root / "final", "--data",
                          f"tokens:{root / 'heldout.npy'}", "--preset", "blocks", "--no-full",
                          "--alphas", "2"], capsys)
    assert code == 0, err
    assert "transformer.h.0" in out and "transformer.h.1" in out


def _bert(cls, seed: int, **extra):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=32, **extra)
    return cls(config)


@pytest.mark.parametrize("task", ["classification", "masked_lm"])
def test_bert_folders_match_a_transformers_loop(tmp_path, task):
    cls = (transformers.BertForSequenceClassification if task == "classification"
           else transformers.BertForMaskedLM)
    model = _bert(cls, 2, num_labels=3)
    model.save_pretrained(tmp_path / "a")
    _perturbed(model, 3)
    model.save_pretrained(tmp_path / "b")
    rng = np.random.default_rng(1)
    x = rng.integers(0, VOCAB, (5, 12))
    if task == "classification":
        y = rng.integers(0, 3, 5)
    else:  # the masked positions only
        y = np.where(rng.random((5, 12)) < 0.3, rng.integers(0, VOCAB, (5, 12)), -100)
    np.savez(tmp_path / "data.npz", inputs=x, targets=y)
    ds = linear_path(tmp_path / "a", tmp_path / "b", data=f"tokens:{tmp_path / 'data.npz'}",
                     alphas=ALPHAS)
    got = ds.sel(run=ds.run[0], group="all", split="test")
    want = reference_lm(cls, tmp_path / "a", tmp_path / "b", torch.as_tensor(x),
                        torch.as_tensor(y), ALPHAS)
    np.testing.assert_allclose(got.loss.values, want[:, 0], rtol=1e-5)
    np.testing.assert_allclose(got.accuracy.values, want[:, 1], rtol=1e-5)


def test_text_data_uses_the_tokenizer_saved_in_the_model_folder(gpt2_pair, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = gpt2_pair
    words = [f"w{i}" for i in range(VOCAB - 1)]
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    folder = tmp_path / "init"
    folder.mkdir()
    for f in (root / "init").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    fast.save_pretrained(folder)
    rng = np.random.default_rng(2)
    ids = rng.integers(1, VOCAB, 60)
    (tmp_path / "corpus.txt").write_text(" ".join(words[i - 1] for i in ids) + " zzz\n")
    stream = np.append(ids, 0)  # the unknown word
    np.save(tmp_path / "stream.npy", stream)
    code, out, err = run(["path", folder, root / "final", "--data",
                          f"text:{tmp_path / 'corpus.txt'}", "--seq-len", "8", "--alphas", "2",
                          "--out", tmp_path / "text.nc"], capsys)
    assert code == 0, err
    code, out, err = run(["path", folder, root / "final", "--data",
                          f"tokens:{tmp_path / 'stream.npy'}", "--seq-len", "8", "--alphas",
                          "2", "--out", tmp_path / "ids.nc"], capsys)
    assert code == 0, err
    text, ids = open_result(tmp_path / "text.nc"), open_result(tmp_path / "ids.nc")
    np.testing.assert_array_equal(text.loss.values, ids.loss.values)


def test_tie_is_left_out_like_save_pretrained(gpt2_pair):
    from ckptscope.adapters import get_adapter

    root = gpt2_pair
    module = get_adapter("huggingface").build(model_dir=str(root / "init"))
    saved = load_checkpoint(root / "init").state
    assert "lm_head.weight" not in saved and set(module.state_dict()) == set(saved)
    assert module.lm_head.weight is module.transformer.wte.weight


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda c: c.update(architectures=["NoSuchModelForCausalLM"]),
         "names the architecture 'NoSuchModelForCausalLM', which is not a model class of "
         "transformers"),
        (lambda c: c.pop("architectures"), "not exactly one model class"),
    ],
)
def test_bad_config_one_line_errors(gpt2_pair, tmp_path, capsys, change, match):
    root = gpt2_pair
    folder = tmp_path / "bad"
    folder.mkdir()
    for f in (root / "init").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))
    code, out, err = run(["path", folder, root / "final", "--data",
                          f"tokens:{root / 'heldout.npy'}", "--alphas", "2"], capsys)
    assert code == 2
    assert match in err and err.count("\n") == 1


def test_vmap_strategy_with_eager_attention_equals_the_loop(gpt2_pair):
    from ckptscope.engine import EvalConfig

    root = gpt2_pair
    data = f"tokens:{root / 'heldout.npy'}"
    options = {"model_dir": str(root / "init"), "attn_implementation": "eager"}
    runs = [linear_path(root / "init", root / "final", data=data, alphas=ALPHAS,
                        groups=["transformer.h.1."], adapter_options=options,
                        config=EvalConfig(strategy=strategy, batch_size=4))
            for strategy in ("loop", "vmap")]
    np.testing.assert_allclose(runs[0].loss.values, runs[1].loss.values, rtol=1e-6)
    assert runs[1].attrs["strategy"] == "vmap"


def test_import_ckptscope_and_reading_a_folder_leave_transformers_out(gpt2_pair):
    import subprocess
    import sys

    code = ("import sys, ckptscope; from ckptscope.checkpoints import load_checkpoint; "
            f"load_checkpoint({str(gpt2_pair / 'init')!r}); "
            "assert 'transformers' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_transformers_is_one_line_naming_the_extra(gpt2_pair, monkeypatch):
    import sys

    from ckptscope.adapters import get_adapter

    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails as if not installed
    with pytest.raises(CkptscopeError, match=r"needs transformers.*pip install -e '\.\[hf\]'"):
        get_adapter("huggingface").build(model_dir=str(gpt2_pair / "init"))


def test_inspect_and_distance_with_adapter_huggingface_take_the_folder_as_model_dir(
        gpt2_pair, capsys):
    """--adapter huggingface on inspect / distance built the model without the folder's
    model_dir (a 'missing a required argument' error); path read it from the folder."""
    root = gpt2_pair
    for command in (["inspect", "--no-keys"], ["distance"]):
        code, out, err = run([*command, root / "init", root / "final", "--adapter",
                              "huggingface", "--preset", "blocks"], capsys)
        assert code == 0, err
        assert "transformer.h.1" in out
    from ckptscope.distance import distances
    ds = distances(root / "init", root / "final", adapter="huggingface")
    assert float(ds.relative.sel(group="all")) > 0


def test_a_state_dict_holding_both_tied_names_reads_like_save_pretrained(gpt2_pair, tmp_path,
                                                                         capsys):
    """A folder whose pytorch_model.bin is torch.save(model.state_dict()) (or an older
    save_pretrained's) holds lm_head.weight beside transformer.wte.weight; the adapter's model
    leaves the alias out, and the pair was refused ('only in the checkpoint: lm_head.weight')."""
    root = gpt2_pair
    model = transformers.GPT2LMHeadModel.from_pretrained(str(root / "final"))
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_bytes((root / "final" / "config.json").read_bytes())
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    assert "lm_head.weight" in torch.load(folder / "pytorch_model.bin", weights_only=True)
    data = f"tokens:{root / 'heldout.npy'}"
    got = linear_path(root / "init", folder, data=data, alphas=ALPHAS)
    want = linear_path(root / "init", root / "final", data=data, alphas=ALPHAS)
    np.testing.assert_array_equal(got.loss.values, want.loss.values)
    code, out, err = run(["path", folder, root / "init", "--data", data, "--alphas", 3], capsys)
    assert code == 0, err
    # a copy that differs from the tensor it is tied to was not saved from this model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["lm_head.weight"] += 1
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(CkptscopeError, match="lm_head.weight is tied to transformer.wte.weight "
                                             "in the model, but .* holds different values"):
        linear_path(root / "init", folder, data=data, alphas=ALPHAS)


def test_a_folder_with_auto_map_is_refused_even_under_a_stock_class_name(gpt2_pair, tmp_path,
                                                                          capsys):
    """auto_map means the folder ships its own modelling code; building the transformers class
    of the same name instead would evaluate another network without a word."""
    root = gpt2_pair
    folder = tmp_path / "remote"
    folder.mkdir()
    config = json.loads((root / "final" / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomGPT2"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes((root / "final" / "model.safetensors").read_bytes())
    data = f"tokens:{root / 'heldout.npy'}"
    code, out, err = run(["path", folder, root / "final", "--data", data, "--alphas", 3], capsys)
    assert code == 2 and err.startswith("error: ") and "auto_map" in err and out == ""
    assert len(err.strip().splitlines()) == 1
    code, out, err = run(["path", folder, root / "final", "--data", data, "--alphas", 3,
                          "--adapter-opt", f"model_dir={folder}", "--adapter-opt",
                          "architecture=GPT2LMHeadModel"], capsys)
    assert code == 0, err
