"""Tests for ``ppkd_fairseq.mixture`` against the NumPy reference.

Inputs are small seeded random neighbour lists over a datastore of 50 rows
and a vocabulary of 12 words. The reference mixes probabilities in float64
(tests/reference.py); the plugin mixes log-probabilities in float32.
"""

import itertools
import math

import numpy as np
import pytest
import torch

import reference
from ppkd_fairseq import mixture

N_ROWS = 50
VOCAB = 12
N_QUERIES = 20
K = 8

TEMPERATURES = [0.5, 10.0]
MUS = [0.0, 0.4, 1.0]
LAMBDAS = [0.0, 0.25, 1.0]


def random_case(seed, num_teachers=1):
    """Return a dict of seeded random inputs, as NumPy arrays."""
    rng = np.random.default_rng(seed)
    return {
        "ids": rng.integers(0, N_ROWS, size=(N_QUERIES, K)),
        "distances": np.sort(rng.uniform(0.0, 40.0, size=(N_QUERIES, K)), axis=1),
        # A small vocabulary of values makes matches with the target common.
        "values": rng.integers(0, VOCAB, size=N_ROWS),
        "targets": rng.integers(0, VOCAB, size=N_QUERIES),
        "lm": reference.log_softmax(rng.normal(size=(N_QUERIES, VOCAB))),  # (n, V)
        "teachers": [reference.log_softmax(2 * rng.normal(size=(N_ROWS, VOCAB))) for _ in range(num_teachers)],
    }


def plugin_parts(case, temperature, mu, lam, valid=None, teachers=None):
    """Score ``case`` with the plugin's target-word functions."""
    ids, targets = case["ids"], case["targets"]
    valid = np.ones(ids.shape, dtype=bool) if valid is None else valid
    teachers = case["teachers"] if teachers is None else teachers
    log_w = mixture.log_weights(torch.from_numpy(case["distances"]), temperature, torch.from_numpy(valid))
    value_match = torch.from_numpy((case["values"][ids] == targets[:, None]) & valid)
    per_teacher = [torch.from_numpy(t[ids, targets[:, None]]).float() for t in teachers]
    if not per_teacher:
        teacher_lp = None
    elif len(per_teacher) == 1:
        teacher_lp = per_teacher[0]
    else:
        teacher_lp = mixture.average_teachers(per_teacher)
    lm = torch.from_numpy(case["lm"][np.arange(N_QUERIES), targets]).float()
    return mixture.ppkd_target_log_prob(lm, log_w, value_match, teacher_lp, mu, lam)


def reference_parts(case, temperature, mu, lam):
    return reference.ppkd_probabilities(
        case["lm"][np.arange(N_QUERIES), case["targets"]], case["ids"], case["distances"], case["values"],
        case["targets"], case["teachers"], temperature, mu, lam,
    )


def assert_log_close(actual, expected_log, atol=1e-5):
    """Compare log-probabilities, requiring -inf at the same places."""
    actual = np.asarray(actual, dtype=np.float64)
    expected_log = np.asarray(expected_log, dtype=np.float64)
    assert not np.isnan(actual).any()
    np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(expected_log))
    finite = np.isfinite(expected_log)
    np.testing.assert_allclose(actual[finite], expected_log[finite], rtol=1e-5, atol=atol)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_log_weights_match_softmax(temperature):
    case = random_case(0)
    log_w = mixture.log_weights(torch.from_numpy(case["distances"]), temperature,
                                torch.ones(N_QUERIES, K, dtype=torch.bool))
    expected = reference.neighbour_weights(case["distances"], temperature)
    np.testing.assert_allclose(log_w.exp().numpy(), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(log_w.exp().sum(-1).numpy(), 1.0, rtol=1e-5)


def test_log_weights_invalid_slots():
    distances = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    valid = torch.tensor([[True, False, True], [False, False, False]])
    log_w = mixture.log_weights(distances, 1.0, valid)
    assert torch.isneginf(log_w[0, 1])
    # The two valid slots share the weight: e^-1 : e^-3.
    np.testing.assert_allclose(log_w[0, [0, 2]].exp().numpy(), [1 / (1 + math.e**-2), 1 / (1 + math.e**2)],
                               rtol=1e-6)
    assert torch.isneginf(log_w[1]).all()
    assert mixture.has_neighbours(log_w).tolist() == [True, False]


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_log_weights_reject_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        mixture.log_weights(torch.zeros(1, 2), temperature, torch.ones(1, 2, dtype=torch.bool))


@pytest.mark.parametrize("temperature,mu,lam", list(itertools.product(TEMPERATURES, MUS, LAMBDAS)))
def test_target_log_prob_grid(temperature, mu, lam):
    case = random_case(1)
    parts = plugin_parts(case, temperature, mu, lam)
    expected = reference_parts(case, temperature, mu, lam)
    for name in ("knn", "final"):
        assert not torch.isnan(parts[name]).any(), f"{name} has NaN at T={temperature}, mu={mu}, lambda={lam}"
    assert_log_close(parts["hard"], reference.safe_log(expected["hard"]))
    assert_log_close(parts["logit"], reference.safe_log(expected["logit"]))
    assert_log_close(parts["knn"], reference.safe_log(expected["knn"]))
    assert_log_close(parts["final"], reference.safe_log(expected["final"]))


@pytest.mark.parametrize("temperature,mu", list(itertools.product(TEMPERATURES, MUS)))
def test_lambda_zero_returns_lm_exactly(temperature, mu):
    case = random_case(2)
    parts = plugin_parts(case, temperature, mu, 0.0)
    assert torch.equal(parts["final"], parts["lm"])


def test_mu_one_ignores_teacher():
    case = random_case(3, num_teachers=2)
    first = plugin_parts(case, 10.0, 1.0, 0.25, teachers=case["teachers"][:1])
    second = plugin_parts(case, 10.0, 1.0, 0.25, teachers=case["teachers"][1:])
    without = plugin_parts(case, 10.0, 1.0, 0.25, teachers=[])
    assert torch.equal(first["final"], second["final"])
    assert torch.equal(first["final"], without["final"])
    assert torch.isneginf(without["logit"]).all()


def test_teacher_required_below_mu_one():
    case = random_case(3)
    with pytest.raises(ValueError, match="mu = 0.5"):
        plugin_parts(case, 10.0, 0.5, 0.25, teachers=[])


def test_vanilla_knn_lm_by_hand():
    # Three neighbours at squared L2 distances 0, ln 2 and ln 4 with T = 1
    # get weights proportional to 1, 1/2 and 1/4, so a = (4/7, 2/7, 1/7).
    # Values (5, 7, 5) and target 5: P_hard = 4/7 + 1/7 = 5/7.
    # With P_LM = 0.3 and lambda = 0.25:
    # P = 0.25 * 5/7 + 0.75 * 0.3 = 0.178571... + 0.225 = 0.403571...
    distances = torch.tensor([[0.0, math.log(2), math.log(4)]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    log_w = mixture.log_weights(distances, 1.0, valid)
    np.testing.assert_allclose(log_w.exp().numpy(), [[4 / 7, 2 / 7, 1 / 7]], rtol=1e-6)
    value_match = torch.tensor([[True, False, True]])
    parts = mixture.ppkd_target_log_prob(torch.tensor([math.log(0.3)]), log_w, value_match, None, 1.0, 0.25)
    assert parts["hard"].exp().item() == pytest.approx(5 / 7, rel=1e-6)
    assert parts["knn"].exp().item() == pytest.approx(5 / 7, rel=1e-6)
    assert parts["final"].exp().item() == pytest.approx(0.25 * 5 / 7 + 0.75 * 0.3, rel=1e-6)
    assert parts["final"].exp().item() == pytest.approx(0.4035714, rel=1e-6)


def test_invalid_neighbours_carry_no_weight():
    case = random_case(4)
    # Make slot 0 the nearest neighbour with the target as value and a
    # teacher that is sure of the target, then mark it invalid: the result
    # must equal scoring without that slot. Other slots may also point at
    # the tampered row, so the reference reads the tampered tables too.
    rng = np.random.default_rng(5)
    valid = rng.random((N_QUERIES, K)) < 0.6
    valid[:, 0] = False
    valid[:, 1] = True  # every query keeps a neighbour
    tampered = dict(case)
    tampered["distances"] = case["distances"].copy()
    tampered["distances"][:, 0] = 0.0
    tampered["ids"] = case["ids"].copy()
    tampered["ids"][:, 0] = N_ROWS - 1
    tampered["values"] = case["values"].copy()
    tampered["teachers"] = [case["teachers"][0].copy()]
    tampered["values"][N_ROWS - 1] = case["targets"][0]
    tampered["teachers"][0][N_ROWS - 1] = reference.log_softmax(np.eye(VOCAB)[case["targets"][0]] * 50.0)
    parts = plugin_parts(tampered, 10.0, 0.4, 0.5, valid=valid)

    expected_final = []
    for i in range(N_QUERIES):
        keep = valid[i]
        parts_i = reference.ppkd_probabilities(
            case["lm"][i, case["targets"][i]][None], case["ids"][i, keep][None], case["distances"][i, keep][None],
            tampered["values"], case["targets"][i][None], tampered["teachers"], 10.0, 0.4, 0.5,
        )
        expected_final.append(parts_i["final"][0])
    assert_log_close(parts["final"], np.log(expected_final))


def test_no_valid_neighbour_falls_back_to_lm():
    case = random_case(6)
    valid = np.ones((N_QUERIES, K), dtype=bool)
    valid[:3] = False
    parts = plugin_parts(case, 10.0, 0.4, 0.5, valid=valid)
    assert torch.equal(parts["final"][:3], parts["lm"][:3])
    assert not torch.equal(parts["final"][3:], parts["lm"][3:])


@pytest.mark.parametrize("weight", [-0.1, 1.5])
def test_mix_rejects_weight(weight):
    with pytest.raises(ValueError, match="mixture weight"):
        mixture.mix(torch.zeros(1), torch.zeros(1), weight)


def test_mix_endpoints_exact():
    a = torch.tensor([-1.0, float("-inf"), -3.0])
    b = torch.tensor([float("-inf"), -2.0, -0.5])
    assert mixture.mix(a, b, 1.0) is a
    assert mixture.mix(a, b, 0.0) is b
    mixed = mixture.mix(a, b, 0.3)
    assert not torch.isnan(mixed).any()
    expected = np.log(0.3 * np.exp(a.double().numpy()) + 0.7 * np.exp(b.double().numpy()))
    np.testing.assert_allclose(mixed.numpy(), expected, rtol=1e-6)


def test_average_teachers_mean_of_probabilities():
    rng = np.random.default_rng(7)
    teachers = [reference.log_softmax(rng.normal(size=(4, VOCAB))) for _ in range(3)]
    averaged = mixture.average_teachers([torch.from_numpy(t) for t in teachers])
    expected = np.log(np.mean([np.exp(t) for t in teachers], axis=0))
    np.testing.assert_allclose(averaged.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(averaged.exp().sum(-1).numpy(), 1.0, rtol=1e-5)


def full_parts(case, temperature, mu, lam, valid):
    """Score ``case`` with the plugin's full-distribution functions."""
    ids = case["ids"]
    log_w = mixture.log_weights(torch.from_numpy(case["distances"]), temperature, torch.from_numpy(valid))
    values = torch.from_numpy(np.where(valid, case["values"][ids], -1))
    hard = mixture.hard_full_log_probs(log_w, values, VOCAB)  # (n, V)
    teacher_full = torch.from_numpy(case["teachers"][0][ids]).float()  # (n, k, V)
    logit = mixture.logit_full_log_probs(log_w, teacher_full)  # (n, V)
    knn = mixture.mix(hard, logit, mu)
    final = mixture.mix(knn, torch.from_numpy(case["lm"]).float(), lam)
    return {"hard": hard, "logit": logit, "knn": knn, "final": final}


@pytest.mark.parametrize("temperature,mu,lam", [(10.0, 0.4, 0.5), (0.5, 0.0, 1.0), (10.0, 1.0, 0.25)])
def test_full_distributions_sum_to_one(temperature, mu, lam):
    case = random_case(8)
    valid = np.random.default_rng(9).random((N_QUERIES, K)) < 0.7
    valid[:, 0] = True
    full = full_parts(case, temperature, mu, lam, valid)
    for name, log_p in full.items():
        total = log_p.double().exp().sum(-1).numpy()
        np.testing.assert_allclose(total, 1.0, rtol=1e-5, err_msg=f"P_{name} does not sum to 1")


@pytest.mark.parametrize("temperature,mu,lam", [(10.0, 0.4, 0.5), (0.5, 0.0, 1.0), (10.0, 1.0, 0.25)])
def test_full_distributions_match_target(temperature, mu, lam):
    case = random_case(10)
    valid = np.random.default_rng(11).random((N_QUERIES, K)) < 0.7
    valid[:, 0] = True
    full = full_parts(case, temperature, mu, lam, valid)
    target = plugin_parts(case, temperature, mu, lam, valid=valid)
    index = torch.from_numpy(case["targets"]).unsqueeze(-1)
    for name in ("hard", "knn", "final"):
        at_target = full[name].gather(-1, index).squeeze(-1)
        assert_log_close(at_target, target[name].double().numpy())
    if mu < 1.0:
        assert_log_close(full["logit"].gather(-1, index).squeeze(-1), target["logit"].double().numpy())
