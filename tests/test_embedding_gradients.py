"""Embedding gradients as transformers has them: ``nn.Embedding(padding_idx=pad_token_id)`` for the word and
position tables, so their pad row gets no gradient from a lookup, with a loss that covers pad positions."""

import jax
import numpy as np
import pytest

import longformer_jax as lj
from tests.conftest import max_diff
from tests.test_modeling import batch, make_pair, mlm_grads_both, no_dropout


def _inputs():
    """The "mixed" batch (right and interior padding, globals) plus a pad id inside a row's real tokens
    (attention mask 1): its lookups of the pad rows must pass no gradient either."""
    ids, am, gm = batch("mixed", np.random.default_rng(9))
    ids = np.where(am == 1, ids, 1)  # padding holds the pad id, as a tokenizer writes it
    ids[0, 6] = 1  # the pad id at a kept position
    return ids, am, gm


@pytest.mark.slow
def test_pad_rows_get_gradients_as_in_transformers(torch):
    pair = make_pair(torch, "masked-lm")
    cfg = pair[3]
    ids, am, gm = _inputs()
    labels = np.random.default_rng(3).integers(5, cfg.vocab_size, ids.shape)  # every position, pads included
    loss, torch_loss, jax_grads, torch_grads = mlm_grads_both(torch, pair, ids, am, gm, labels)
    assert abs(loss - torch_loss) <= 1e-5
    assert set(jax_grads) == set(torch_grads), set(jax_grads) ^ set(torch_grads)
    worst = {k: max_diff(jax_grads[k], torch_grads[k]) for k in torch_grads}
    assert max(worst.values()) <= 1e-4, sorted(worst.items(), key=lambda kv: -kv[1])[:3]

    pad = cfg.pad_token_id
    position = jax_grads["longformer.embeddings.position_embeddings.weight"]
    word = jax_grads["longformer.embeddings.word_embeddings.weight"]
    # The loss reaches the pad rows' lookups (pad outputs are scored), yet the position pad row gets nothing.
    assert np.abs(position[pad]).max() == 0.0
    assert np.abs(position[pad + 1]).max() > 0.0
    # The word pad row's gradient is the tied decoder's alone (the logit of the pad id at every position).
    assert np.abs(word[pad]).max() > 0.0


@pytest.mark.slow
def test_pad_rows_without_a_tied_decoder_get_no_gradient(torch):
    """The bare encoder with a loss on every output, pads included: both pad rows get exactly zero."""
    tm, model, params, cfg = make_pair(torch, "base")
    no_dropout(torch, tm)
    ids, am, gm = _inputs()
    weights = np.random.default_rng(4).standard_normal((*ids.shape, cfg.hidden_size)).astype(np.float32)
    tm.zero_grad()
    h = tm(torch.tensor(ids), attention_mask=torch.tensor(am), global_attention_mask=torch.tensor(gm))[0]
    (h * torch.tensor(weights)).mean().backward()
    torch_grads = {k: p.grad.numpy() for k, p in tm.named_parameters() if p.grad is not None}

    def loss_fn(p):
        out = model.apply({"params": p}, ids, attention_mask=am, global_attention_mask=gm)
        return (out.last_hidden_state * weights).mean()

    grads = lj.state_dict_from_params(jax.grad(loss_fn)(params), cfg, "base")
    worst = {k: max_diff(grads[k], torch_grads[k]) for k in torch_grads}
    assert max(worst.values()) <= 1e-4, sorted(worst.items(), key=lambda kv: -kv[1])[:3]
    for name in ("word_embeddings", "position_embeddings"):
        table = grads[f"embeddings.{name}.weight"]
        assert np.abs(table[cfg.pad_token_id]).max() == 0.0, name
        assert np.abs(table).max() > 0.0, name
