"""Token data (ckptscope.data.tokens): windows, streams, .npz pairs, and their errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ckptscope.cli import main
from ckptscope.data import load_data
from ckptscope.data.tokens import with_seq_len, with_tokenizer
from ckptscope.errors import CkptscopeError


def test_tokens_windows_are_inputs_and_next_tokens(tmp_path):
    windows = np.random.default_rng(0).integers(0, 30, (5, 9)).astype(np.int32)
    np.save(tmp_path / "w.npy", windows)
    (x, y), = load_data(f"tokens:{tmp_path / 'w.npy'}").values()
    assert x.dtype == y.dtype == torch.long and x.shape == y.shape == (5, 8)
    for i in range(5):
        assert x[i].tolist() == windows[i, :-1].tolist()
        assert y[i].tolist() == windows[i, 1:].tolist()


def test_tokens_stream_is_cut_into_windows(tmp_path):
    stream = np.arange(23)
    np.save(tmp_path / "s.npy", stream)
    splits = load_data(f"tokens:{tmp_path / 's.npy'},seq_len=5")
    x, y = splits["test"]
    assert x.shape == (4, 5)  # (23 - 1) // 5
    for i in range(4):  # a plain reading of "the next token at every position"
        assert x[i].tolist() == list(range(5 * i, 5 * i + 5))
        assert y[i].tolist() == list(range(5 * i + 1, 5 * i + 6))


def test_tokens_npz_pairs_keep_their_shapes_and_ignored_targets(tmp_path):
    x = np.ones((3, 4), dtype=np.int64)
    y = np.array([[-100, 2, -100, 1]] * 3)
    np.savez(tmp_path / "m.npz", inputs=x, targets=y)
    (gx, gy), = load_data(f"tokens:{tmp_path / 'm.npz'}").values()
    assert gx.tolist() == x.tolist() and gy.tolist() == y.tolist()


@pytest.mark.parametrize(
    "make, spec_tail, match",
    [
        (lambda p: np.save(p / "d.npy", np.arange(10)), "", r"1-D stream of 10 tokens; say how "
                                                            r"long a window is: --seq-len T"),
        (lambda p: np.save(p / "d.npy", np.arange(10)), ",seq_len=20", "fewer than one window"),
        (lambda p: np.save(p / "d.npy", np.arange(10)), ",seq_len=x", "not a positive integer"),
        (lambda p: np.save(p / "d.npy", np.arange(10)), ",window=3", "is not one of seq_len="),
        (lambda p: np.save(p / "d.npy", np.ones((2, 3)) / 2), "", "float64, not integer"),
        (lambda p: np.save(p / "d.npy", -np.ones((2, 3), dtype=int)), "", "hold -1; token ids "
                                                                          "are >= 0"),
        (lambda p: np.save(p / "d.npy", np.ones((2, 1), dtype=int)), "", r"shape \(2, 1\)"),
        (lambda p: np.save(p / "d.npy", np.array([{"a": 1}], dtype=object)), "",
         "not a readable .npy/.npz file"),
        (lambda p: None, "", "does not exist"),
    ],
)
def test_tokens_bad_files_one_line_errors(tmp_path, make, spec_tail, match):
    make(tmp_path)
    with pytest.raises(CkptscopeError, match=match) as err:
        load_data(f"tokens:{tmp_path / 'd.npy'}{spec_tail}")
    assert "\n" not in str(err.value)


def test_tokens_npz_errors(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.ones(3, dtype=int))
    with pytest.raises(CkptscopeError, match=r"has arrays \['x'\], not 'inputs' and 'targets'"):
        load_data(f"tokens:{tmp_path / 'a.npz'}")
    np.savez(tmp_path / "b.npz", inputs=np.ones((3, 2), dtype=int), targets=np.ones(2, dtype=int))
    with pytest.raises(CkptscopeError, match="give as many of each"):
        load_data(f"tokens:{tmp_path / 'b.npz'}")
    np.savez(tmp_path / "c.npz", inputs=np.ones((2, 2), dtype=int),
             targets=np.array([[-100, -7], [0, 0]]))
    with pytest.raises(CkptscopeError, match=r"targets hold -7; .*\(or -100, left out"):
        load_data(f"tokens:{tmp_path / 'c.npz'}")


def test_text_needs_a_tokenizer_and_a_window(tmp_path):
    (tmp_path / "t.txt").write_text("a b c\n")
    with pytest.raises(CkptscopeError, match="no tokenizer; the start checkpoint is not a model "
                                             "folder"):
        load_data(f"text:{tmp_path / 't.txt'},seq_len=2")
    with pytest.raises(CkptscopeError, match="say how many tokens a window holds"):
        load_data(f"text:{tmp_path / 't.txt'},tokenizer={tmp_path}")


def test_with_tokenizer_names_the_model_folder_only(tmp_path):
    assert with_tokenizer("text:t.txt", str(tmp_path)) == "text:t.txt"  # no config.json
    (tmp_path / "config.json").write_text("{}")
    assert with_tokenizer("text:t.txt", str(tmp_path)) == f"text:t.txt,tokenizer={tmp_path}"
    assert with_tokenizer("text:t.txt,tokenizer=x", str(tmp_path)) == "text:t.txt,tokenizer=x"
    assert with_tokenizer("spiral", str(tmp_path)) == "spiral"


def test_with_seq_len_applies_to_token_data_only():
    assert with_seq_len("tokens:a.npy", 8) == "tokens:a.npy,seq_len=8"
    assert with_seq_len("spiral", None) == "spiral"
    with pytest.raises(CkptscopeError, match="--seq-len applies to --data tokens:FILE or text"):
        with_seq_len("spiral", 8)
    with pytest.raises(CkptscopeError, match="give the window length once"):
        with_seq_len("tokens:a.npy,seq_len=4", 8)


def test_cli_seq_len_with_other_data_is_exit_2(tmp_path, capsys):
    code = main(["path", "a.safetensors", "b.safetensors", "--data", "spiral", "--seq-len", "4"])
    err = capsys.readouterr().err
    assert code == 2 and "error: --seq-len applies to --data tokens:FILE" in err


def test_text_refuses_a_folder_without_tokenizer_files(tmp_path):
    """transformers builds an empty tokenizer from a bare config.json (all text -> no ids, or
    [UNK]); a model folder saved without its tokenizer is refused, naming the fix."""
    pytest.importorskip("transformers")
    (tmp_path / "t.txt").write_text("a b c d e f\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(CkptscopeError,
                       match="no tokenizer is saved in .*tokenizer.save_pretrained"):
        load_data(f"text:{tmp_path / 't.txt'},seq_len=2,tokenizer={tmp_path / 'model'}")


def test_seq_len_that_saved_windows_do_not_have_is_refused(tmp_path):
    """--seq-len on a file of windows was ignored: windows of 16 came back for seq_len=4."""
    ids = np.arange(6 * 17).reshape(6, 17) % 50
    np.save(tmp_path / "w.npy", ids)
    np.savez(tmp_path / "p.npz", inputs=ids[:, :-1], targets=ids[:, 1:])
    for name in ("w.npy", "p.npz"):
        with pytest.raises(CkptscopeError, match=r"holds windows of shape \(6, 16\) already, so "
                                                 r"seq_len=4 \(--seq-len\) cannot apply"):
            load_data(f"tokens:{tmp_path / name},seq_len=4")
        x, _ = load_data(f"tokens:{tmp_path / name},seq_len=16")["test"]  # the same: fine
        assert tuple(x.shape) == (6, 16)
