"""The GPT's layers and the whole model against finite differences and a PyTorch GPT with identical weights."""

import numpy
import pytest
import torch
from reference import (adamw_steps_match_torch, assert_matches_torch, max_relative_difference,
                       whole_model_matches_torch)

import mnn
from bench.torch_mirror import mirror
from mnn import models
from mnn.data.text import CharTokenizer, locate_text
from mnn.generate import generate
from mnn.gradcheck import check_layer

SHAKESPEARE = locate_text()  # the copy shipped in the package
TOL = 1e-6


def test_embedding(float64, rng):
    layer = mnn.EmbeddingLayer(7, 5)
    indices = rng.integers(0, 7, (3, 4))
    indices[0, :2] = 2  # repeated tokens must add up
    assert max(check_layer(layer, indices).values()) <= TOL
    model, _, _ = mirror(mnn.SequentialLayers([layer]), torch.float64)
    layer.zero_grads()
    out = layer.forward(indices)
    upstream = rng.standard_normal(out.shape)
    assert layer.backward(upstream) is None
    model(torch.tensor(indices)).backward(torch.tensor(upstream))
    assert max_relative_difference(layer.grads["weight"], model[0].weight.grad.numpy()) <= TOL


def test_positional_embedding(float64, rng):
    layer = mnn.PositionalEmbeddingLayer(6, 4)
    x = rng.standard_normal((2, 5, 4))
    assert max(check_layer(layer, x).values()) <= TOL
    assert_matches_torch(layer, lambda x, params: x + params["weight"][:5], x)


@pytest.mark.parametrize("causal", [True, False])
def test_attention(causal, float64, rng):
    layer = mnn.MultiHeadAttention(8, 2, causal=causal)
    x = rng.standard_normal((2, 5, 8))
    assert max(check_layer(layer, x).values()) <= TOL
    model, _, pairs = mirror(mnn.SequentialLayers([layer]), torch.float64)
    compare_with_mirror(layer, model, pairs, x, rng)


def test_attention_is_causal(float64, rng):
    layer = mnn.MultiHeadAttention(8, 2)
    x = rng.standard_normal((1, 6, 8))
    changed = x.copy()
    changed[0, 4:] += 1.0
    assert numpy.allclose(layer.forward(x)[0, :4], layer.forward(changed)[0, :4])


def test_residual_block(float64, rng):
    body = mnn.SequentialLayers([mnn.LayerNormLayer(6), mnn.LinearLayer(6, 6), mnn.GeluLayer()])
    block = mnn.ResidualBlock(body)
    x = rng.standard_normal((3, 4, 6))
    assert set(block.params) == {"0.weight", "0.bias", "1.w", "1.b"}
    assert max(check_layer(block, x).values()) <= TOL
    model, _, pairs = mirror(mnn.SequentialLayers([block]), torch.float64)
    compare_with_mirror(block, model, pairs, x, rng)


def compare_with_mirror(layer, model, pairs, x, rng):
    layer.zero_grads()
    out = layer.forward(x)
    upstream = rng.standard_normal(out.shape)
    dx = layer.backward(upstream)
    tx = torch.tensor(x, requires_grad=True)
    t_out = model(tx)
    t_out.backward(torch.tensor(upstream))
    assert max_relative_difference(out, t_out.detach().numpy()) <= TOL
    assert max_relative_difference(dx, tx.grad.numpy()) <= TOL
    grads = layer.grads
    for name, parameter in pairs:
        assert max_relative_difference(grads[name.removeprefix("0.")], parameter.grad.numpy()) <= TOL, name


def small_gpt(tie_weights=True, bias=False):
    mnn.backend.seed(0)
    return models.gpt(vocab_size=11, context=8, layers=2, heads=2, width=16, tie_weights=tie_weights, bias=bias)


@pytest.mark.parametrize("tie_weights,bias", [(True, False), (False, True)])
def test_whole_gpt_gradients_equal_torch(tie_weights, bias, float64, rng, kernel_mode):
    whole_model_matches_torch(small_gpt(tie_weights, bias), rng, vocab=11, tol=TOL)


def test_adamw_steps_of_the_whole_gpt_equal_torch(float64, rng, kernel_mode):
    adamw_steps_match_torch(small_gpt(), rng, vocab=11)


def test_generation_is_reproducible_and_checks_the_prompt():
    net = small_gpt()
    tokenizer = CharTokenizer("abcdefghij\n")
    first = generate(net, tokenizer, "abc", 20, context=8, top_k=3, seed=5)
    assert first == generate(net, tokenizer, "abc", 20, context=8, top_k=3, seed=5)
    assert len(first) == 23 and first.startswith("abc") and set(first) <= set(tokenizer.chars)
    with pytest.raises(ValueError, match=r"not in the vocabulary: 'XZ'"):
        generate(net, tokenizer, "aXbZ", 5, context=8)
    windows = generate(net, tokenizer, "ab\r\nc\r", 20, context=8, top_k=3, seed=5)  # line ends as trained on
    assert windows == generate(net, tokenizer, "ab\nc\n", 20, context=8, top_k=3, seed=5)
    for other in ("abc\n", "abcdefghijklmnop"):  # fewer tokens than the network knows, and more
        with pytest.raises(ValueError, match=f"the network knows 11 tokens and the tokenizer has {len(set(other))}"):
            generate(net, CharTokenizer(other), "abc", 5, context=8)


def test_tinyshakespeare_ships_with_mnn_and_other_texts_download_checked(tmp_path, monkeypatch):
    import mnn.data.text as text
    assert SHAKESPEARE == text.SHIPPED_TEXT and SHAKESPEARE.stat().st_size == 1115394
    assert locate_text(SHAKESPEARE) == SHAKESPEARE
    monkeypatch.setenv("MNN_CACHE", str(tmp_path))
    found = locate_text(url=SHAKESPEARE.as_uri(), sha256=text.TINY_SHAKESPEARE_SHA256)
    assert found == tmp_path / "text" / f"{text.TINY_SHAKESPEARE_SHA256}.txt"
    assert found.read_bytes() == SHAKESPEARE.read_bytes()
    monkeypatch.setenv("MNN_CACHE", str(tmp_path / "other"))
    with pytest.raises(mnn.data.ChecksumError):
        locate_text(url=SHAKESPEARE.as_uri(), sha256="0" * 64)
    assert text.TINY_SHAKESPEARE_SHA256.startswith("86c4e6aa")


def test_unreachable_text_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MNN_CACHE", str(tmp_path))
    with pytest.raises(ConnectionError, match="nowhere.txt could not be downloaded into .* --data-dir"):
        locate_text(url=(tmp_path / "nowhere.txt").as_uri(), sha256="0" * 64)


def test_validation_loss_covers_the_whole_split_once(tmp_path, monkeypatch):
    from mnn import text_task
    from mnn.train import TrainConfig
    text = tmp_path / "text.txt"
    text.write_text("".join(numpy.random.default_rng(0).choice(list("abcdefghij\n"), 1000)))
    task = text_task.TextTask(TrainConfig(model="gpt", dataset="tinyshakespeare", data_dir=str(text), batch_size=4,
                                          model_kwargs={"context": 8}))
    net = small_gpt()
    windows = (len(task.val) - 1) // 8  # 100 validation characters: 12 windows of 8, and one of 3
    sums = [float(net(task.val[None, i * 8:i * 8 + 8], task.val[None, i * 8 + 1:i * 8 + 9])) * 8
            for i in range(windows)]
    sums.append(float(net(task.val[None, 96:99], task.val[None, 97:100])) * 3)
    monkeypatch.setattr(text_task, "EVAL_CHUNK", 5)  # chunks of 5, 5 and 2 windows: weighted by size
    assert windows == 12 and task.evaluate(net)["val_loss"] == pytest.approx(sum(sums) / 99, rel=1e-5)


def test_scores_that_overflowed_are_refused_saying_so_rather_than_sampled():
    from mnn.generate import next_token_probabilities
    for logits in ([1.0, numpy.nan, 0.0], [numpy.inf, 0.0, 1.0]):
        with pytest.raises(ValueError, match="scores for the next character are not all finite"):
            next_token_probabilities(numpy.array(logits), 0.8, 0)
