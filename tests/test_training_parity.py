"""Training loss and gradients re-derived live from transformers + torch autograd + peft (``-m parity``)."""

import pytest
from training_cases import CASES, group_errors, make_inputs, ours_loss_and_grads, torch_loss_and_grads

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

pytestmark = pytest.mark.parity


@pytest.mark.parametrize("name", CASES)
def test_live_loss_and_gradients(name):
    inputs = make_inputs(name)
    expected_loss, expected = torch_loss_and_grads(name, inputs, seed=7)
    loss, grads = ours_loss_and_grads(name, inputs, seed=7)
    assert abs(loss - expected_loss) / expected_loss < 1e-5
    errors = group_errors(grads, expected)
    assert set(errors) == {"query_tokens", "qformer", "language_projection", "vision_model", "lora_a", "lora_b"}
    assert max(errors.values()) < 1e-4, errors
