"""The training loss and gradients against transformers + torch autograd's, saved by
fixtures/make_training_fixtures.py (test_training_parity.py recomputes them live)."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES, REFERENCE
from training_cases import CASES, group_errors, ours_loss_and_grads

from mlx_blip2.models.loss import causal_lm_loss, seq2seq_loss, shift_tokens_right


def saved(name):
    data = np.load(REFERENCE / f"training-{name}.npz")
    inputs = {k[len("input."):]: data[k] for k in data.files if k.startswith("input.")}
    grads = {k[len("grad."):]: data[k] for k in data.files if k.startswith("grad.")}
    return inputs, float(data["loss"]), grads


@pytest.mark.parametrize("name", CASES)
def test_loss_and_gradients_match_torch(name):
    inputs, expected_loss, expected = saved(name)
    loss, grads = ours_loss_and_grads(name, inputs)
    assert abs(loss - expected_loss) / expected_loss < 1e-5
    errors = group_errors(grads, expected)
    wanted = {"query_tokens", "qformer", "language_projection", "vision_model", "lora_a", "lora_b"}
    assert set(errors) == wanted
    assert max(errors.values()) < 1e-4, errors


def test_causal_loss_shifts_and_ignores_masked_labels():
    logits = mx.array(np.random.default_rng(0).standard_normal((2, 5, 7)).astype(np.float32))
    labels = mx.array([[-100, 3, 4, -100, 6], [1, 2, -100, -100, -100]])
    lp = np.array(logits) - np.log(np.exp(np.array(logits)).sum(-1, keepdims=True))
    # position t predicts label t + 1: row 0 scores 3 (t=0), 4 (t=1), 6 (t=3); row 1 scores 2 (t=0)
    expected = -(lp[0, 0, 3] + lp[0, 1, 4] + lp[0, 3, 6] + lp[1, 0, 2]) / 4
    assert causal_lm_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    # Logits longer than the labels (legacy checkpoints: queries first): the last positions are the labels'.
    longer = mx.concatenate([mx.zeros((2, 3, 7)), logits], axis=1)
    assert causal_lm_loss(longer, labels).item() == pytest.approx(expected, rel=1e-6)


def test_seq2seq_loss_and_decoder_inputs():
    labels = mx.array([[5, 6, 1, -100], [7, 1, -100, -100]])
    np.testing.assert_array_equal(np.array(shift_tokens_right(labels, 0, 0)), [[0, 5, 6, 1], [0, 7, 1, 0]])
    logits = mx.array(np.random.default_rng(1).standard_normal((2, 4, 9)).astype(np.float32))
    lp = np.array(logits) - np.log(np.exp(np.array(logits)).sum(-1, keepdims=True))
    expected = -(lp[0, 0, 5] + lp[0, 1, 6] + lp[0, 2, 1] + lp[1, 0, 7] + lp[1, 1, 1]) / 5
    assert seq2seq_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_model_without_labels_has_no_loss():
    from mlx_blip2 import load

    model = load(FIXTURES / "tiny-blip2-opt").model
    inputs, _, _ = saved("tiny-blip2-opt")
    out = model(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
    assert out.loss is None
    with_labels = model(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"],
                        labels=inputs["labels"])
    np.testing.assert_array_equal(np.array(with_labels.logits), np.array(out.logits))
    assert np.isfinite(with_labels.loss.item())
