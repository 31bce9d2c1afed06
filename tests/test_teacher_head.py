"""Tests for ``ppkd_fairseq.teacher_head``: one dot product per target word.

The expected values are the full softmax of the real output layers: fairseq's
``AdaptiveSoftmax.get_log_prob`` for the tiny adaptive-softmax teacher and
``log_softmax`` of the logits for a full softmax. Every word of the
vocabulary is scored for every state.
"""

import numpy as np
import pytest
import torch

import capture
import reference
from ppkd_fairseq.builder import causal_teacher_head
from ppkd_fairseq.teacher_head import (
    TeacherHead,
    adaptive_softmax_head,
    full_log_probs,
    log_normalizers,
    softmax_head,
    target_log_probs,
)

N_STATES = 16
TOLERANCE = 1e-4


def random_states(dim, seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(N_STATES, dim, generator=generator)


def every_word_log_probs(head, states):
    """Score each of the V words for each state through stored normalizers: (n, V)."""
    z = log_normalizers(head, states)  # (n, C)
    vocab = head.vocab_size
    expanded = states.unsqueeze(1).expand(-1, vocab, -1)  # (n, V, d)
    targets = torch.arange(vocab).expand(states.shape[0], vocab)  # (n, V)
    return target_log_probs(head, expanded, z.unsqueeze(1), targets)


@pytest.fixture(scope="module")
def adaptive_teacher(tiny_data, tiny_models):
    model, _ = capture.load_model(tiny_models["teacher_adaptive"], tiny_data)
    assert model.decoder.adaptive_softmax is not None
    return model


@pytest.fixture(scope="module")
def softmax_student(tiny_data, tiny_models):
    model, _ = capture.load_model(tiny_models["student"], tiny_data)
    assert model.decoder.adaptive_softmax is None
    return model


def fairseq_adaptive_log_probs(model, states):
    with torch.no_grad():
        return model.decoder.adaptive_softmax.get_log_prob(states.float().unsqueeze(0), None)[0]


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_adaptive_head_matches_get_log_prob(adaptive_teacher, scale):
    head = adaptive_softmax_head(adaptive_teacher.decoder.adaptive_softmax)
    assert head.num_clusters == 3  # cutoff 20,40: the head and two tail clusters
    states = random_states(head.dim, seed=1, scale=scale)
    expected = fairseq_adaptive_log_probs(adaptive_teacher, states)
    torch.testing.assert_close(every_word_log_probs(head, states), expected, rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(full_log_probs(head, states), expected, rtol=0, atol=TOLERANCE)


def test_adaptive_head_float16_states(adaptive_teacher):
    head = adaptive_softmax_head(adaptive_teacher.decoder.adaptive_softmax)
    stored = random_states(head.dim, seed=2).half()
    expected = fairseq_adaptive_log_probs(adaptive_teacher, stored.float())
    torch.testing.assert_close(every_word_log_probs(head, stored), expected, rtol=0, atol=TOLERANCE)


def test_adaptive_head_from_builder(adaptive_teacher):
    head = causal_teacher_head(adaptive_teacher, adaptive_teacher.decoder.adaptive_softmax.vocab_size)
    states = random_states(head.dim, seed=3)
    expected = fairseq_adaptive_log_probs(adaptive_teacher, states)
    torch.testing.assert_close(every_word_log_probs(head, states), expected, rtol=0, atol=TOLERANCE)


def test_reference_adaptive_matches_get_log_prob(adaptive_teacher, tiny_models):
    # The NumPy reference of the scoring tests reads the checkpoint's matrices.
    kind, head_weight, tails, cutoff = capture.output_layer_matrices(tiny_models["teacher_adaptive"])
    assert kind == "adaptive"
    states = random_states(head_weight.shape[1], seed=4)
    expected = fairseq_adaptive_log_probs(adaptive_teacher, states).double().numpy()
    actual = reference.adaptive_softmax_log_probs(states.numpy(), head_weight, tails, cutoff)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_softmax_head_matches_log_softmax(softmax_student, dtype):
    projection = softmax_student.decoder.output_projection
    head = softmax_head(projection.weight)
    assert head.num_clusters == 1
    states = random_states(head.dim, seed=5, scale=3.0).to(dtype)
    with torch.no_grad():
        expected = torch.log_softmax(softmax_student.decoder.output_layer(states.float()), dim=-1)
    torch.testing.assert_close(every_word_log_probs(head, states), expected, rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(full_log_probs(head, states), expected, rtol=0, atol=TOLERANCE)


def test_softmax_head_from_builder(softmax_student):
    head = causal_teacher_head(softmax_student, len(softmax_student.decoder.dictionary))
    states = random_states(head.dim, seed=6)
    with torch.no_grad():
        expected = torch.log_softmax(softmax_student.decoder.output_layer(states), dim=-1)
    torch.testing.assert_close(every_word_log_probs(head, states), expected, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_softmax_head_with_bias(dtype):
    torch.manual_seed(7)
    layer = torch.nn.Linear(24, 40, bias=True)
    with torch.no_grad():
        layer.bias.normal_(0.0, 2.0)
        head = softmax_head(layer.weight, layer.bias)
        states = random_states(24, seed=8, scale=2.0).to(dtype)
        expected = torch.log_softmax(layer(states.float()), dim=-1)
    torch.testing.assert_close(every_word_log_probs(head, states), expected, rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(full_log_probs(head, states), expected, rtol=0, atol=TOLERANCE)


def test_softmax_head_drops_extra_rows():
    # A masked LM's output layer has a <mask> row after the shared words;
    # keeping the first V rows renormalizes over those words only.
    torch.manual_seed(9)
    layer = torch.nn.Linear(24, 41, bias=True)
    with torch.no_grad():
        head = softmax_head(layer.weight, layer.bias, vocab_size=40)
        states = random_states(24, seed=10)
        expected = torch.log_softmax(layer(states)[:, :40], dim=-1)
    assert head.vocab_size == 40
    torch.testing.assert_close(every_word_log_probs(head, states), expected, rtol=0, atol=TOLERANCE)


def test_softmax_head_rejects_large_vocab():
    with pytest.raises(ValueError, match="vocab_size 41 exceeds"):
        softmax_head(torch.zeros(40, 8), vocab_size=41)


def test_target_log_probs_broadcast_neighbours(adaptive_teacher):
    # Retrieval scores (n, k) neighbour states against one target per query.
    head = adaptive_softmax_head(adaptive_teacher.decoder.adaptive_softmax)
    n, k = 4, 4
    states = random_states(head.dim, seed=11)[: n * k].view(n, k, -1)
    z = log_normalizers(head, states.view(n * k, -1)).view(n, k, -1)
    targets = torch.tensor([[0], [25], [45], [63]])  # head, tail 1, tail 2 (last word)
    actual = target_log_probs(head, states, z, targets)  # (n, k)
    full = fairseq_adaptive_log_probs(adaptive_teacher, states.view(n * k, -1)).view(n, k, -1)
    expected = full.gather(-1, targets.unsqueeze(1).expand(n, k, 1)).squeeze(-1)
    torch.testing.assert_close(actual, expected, rtol=0, atol=TOLERANCE)


def test_state_dict_round_trip(adaptive_teacher):
    head = adaptive_softmax_head(adaptive_teacher.decoder.adaptive_softmax)
    restored = TeacherHead.from_state_dict(head.state_dict())
    states = random_states(head.dim, seed=12)
    assert torch.equal(full_log_probs(restored, states), full_log_probs(head, states))
    assert restored.tail_ranges == head.tail_ranges
