"""Tests for the ``ppkd_distillation`` criterion and its teacher sources.

The criterion runs in-process on batches of conftest.py's ``tiny_data``
training split, with the ``tiny_models`` checkpoints: ``student`` (full
softmax) and ``teacher_adaptive`` (adaptive softmax, cutoffs 20 and 40),
which also serves as an adaptive-softmax student. The offline teacher is a
datastore dumped with fairseq-eval-lm over the training split. References
are NumPy computations in float64.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from fairseq import checkpoint_utils
from fairseq.criterions.adaptive_loss import AdaptiveLoss
from fairseq.criterions.cross_entropy import CrossEntropyCriterion
from fairseq.data import Dictionary

from conftest import COMMON_LM, USER_DIR, eval_lm, run
from ppkd_fairseq import manifest as mf
from ppkd_fairseq.criterion import DistillationConfig, DistillationCriterion
from ppkd_fairseq.distillation import (
    adaptive_softmax_log_probs,
    chunked_distillation_loss,
    clustered_log_probs,
    distillation_loss,
    temper,
)
from ppkd_fairseq.distillation_teachers import DatastoreTeacher, check_teacher_dictionary
from ppkd_fairseq.rows import block_starts, target_rows

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log_softmax_np(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kd_loss_np(student_log_probs, teacher_log_probs, target, alpha, temperature):
    """Return (loss, nll, kl) in float64 from (n, V) log-probabilities."""
    nll = -student_log_probs[np.arange(len(target)), target].sum()
    student_tempered = log_softmax_np(student_log_probs / temperature)
    teacher_tempered = log_softmax_np(teacher_log_probs / temperature)
    kl = (np.exp(teacher_tempered) * (teacher_tempered - student_tempered)).sum()
    return alpha * nll + (1 - alpha) * temperature**2 * kl, nll, kl


def head_log_probs_np(head, states):
    """Brute-force (n, V) log-probabilities of a TeacherHead, float64."""
    u = states.astype(np.float64)
    weight = head.weight.double().numpy()
    logits = u @ weight.T + head.bias.double().numpy()  # (n, V)
    if not head.tail_ranges:
        return log_softmax_np(logits)
    cluster_logits = u @ head.cluster_logit_weight[1:].double().numpy().T  # (n, n_tail)
    head_part = log_softmax_np(np.concatenate([logits[:, : head.head_size], cluster_logits], axis=1))
    pieces = [head_part[:, : head.head_size]]
    for i, tail in enumerate(head.tail_weights):
        tail_logits = u @ tail.double().numpy().T  # (n, V_i)
        pieces.append(log_softmax_np(tail_logits) + head_part[:, head.head_size + i : head.head_size + i + 1])
    return np.concatenate(pieces, axis=1)


@pytest.fixture(scope="module")
def datastore(tiny_data, tiny_models, tmp_path_factory):
    """A datastore over the training split with the adaptive teacher's states as ``causal``."""
    folder = str(tmp_path_factory.mktemp("kd_datastore") / "dstore")
    eval_lm(tiny_data, tiny_models["student"], "--ppkd-mode", "dump", "--ppkd-dstore", folder)
    eval_lm(tiny_data, tiny_models["teacher_adaptive"], "--ppkd-mode", "dump_teacher",
            "--ppkd-dstore", folder, "--ppkd-teacher-name", "causal")
    return folder


def load(checkpoint, data):
    """Load a checkpoint with its task (language_modeling) and the training split."""
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([checkpoint], arg_overrides={"data": data})
    task.load_dataset("train")
    model = models[0]
    model.train()  # training mode with dropout 0, as the tiny models were trained
    return model, task


def training_batches(task, count):
    """Return the first ``count`` training batches, the last one with padding."""
    itr = task.get_batch_iterator(dataset=task.dataset("train"), max_tokens=128, seed=1)
    batches = list(itr.next_epoch_itr(shuffle=False))
    padded = [b for b in batches if b["target"].eq(task.target_dictionary.pad()).any()]
    assert padded, "expected a batch with a short final block"
    return batches[: count - 1] + padded[:1]


def build_criterion(task, **options):
    settings = dict(kd_alpha=0.5, kd_temperature=2.0, sentence_avg=False, train_subset="train")
    settings.update(options)
    return DistillationCriterion(DistillationConfig(**settings), task)


# distillation math


def test_distillation_loss_hand_computed():
    rng = np.random.default_rng(0)
    student = log_softmax_np(rng.normal(size=(3, 5)) * 2)
    teacher = log_softmax_np(rng.normal(size=(3, 5)) * 2)
    target = np.array([4, 0, 2])

    loss, nll, kl = distillation_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(target), 0.3, 2.5)

    expected_loss, expected_nll, expected_kl = kd_loss_np(student, teacher, target, 0.3, 2.5)
    assert float(nll) == pytest.approx(expected_nll, rel=1e-5)
    assert float(kl) == pytest.approx(expected_kl, rel=1e-5)
    assert float(loss) == pytest.approx(expected_loss, rel=1e-5)


def test_distillation_loss_identical_distributions():
    log_probs = torch.log_softmax(torch.randn(4, 7, generator=torch.Generator().manual_seed(1)), dim=-1)
    target = torch.tensor([0, 1, 2, 3])

    loss, nll, kl = distillation_loss(log_probs, log_probs, target, 0.5, 2.0)

    assert float(kl) == pytest.approx(0.0, abs=1e-6)
    assert float(loss) == pytest.approx(0.5 * float(nll), rel=1e-6)


def test_distillation_gradient_matches_numpy():
    # The KL term has a hand-written gradient (TemperedKL). Central differences of the
    # NumPy loss check it through the whole loss, in float64.
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(4, 6)) * 2
    teacher = log_softmax_np(rng.normal(size=(4, 6)) * 2)
    target = np.array([5, 0, 3, 3])
    alpha, tau = 0.3, 2.5
    x = torch.tensor(logits, requires_grad=True)

    loss, _, _ = distillation_loss(torch.log_softmax(x, dim=-1), torch.tensor(teacher), torch.tensor(target),
                                   alpha, tau)
    loss.backward()

    def total(z):
        return kd_loss_np(log_softmax_np(z), teacher, target, alpha, tau)[0]

    step = 1e-6
    expected = np.zeros_like(logits)
    for i in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            up, down = logits.copy(), logits.copy()
            up[i, j] += step
            down[i, j] -= step
            expected[i, j] = (total(up) - total(down)) / (2 * step)
    np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-5, atol=1e-7)


def clustered_logits(n, sizes, seed):
    """Return random float64 student logits: head logits, then one (n, V_i) matrix per tail.

    The head covers ``sizes[0]`` words and ``len(sizes) - 1`` tail clusters. A single size
    gives the logits of a full softmax.
    """
    g = torch.Generator().manual_seed(seed)
    head = torch.randn(n, sizes[0] + len(sizes) - 1, generator=g, dtype=torch.float64) * 2
    tails = [torch.randn(n, size, generator=g, dtype=torch.float64) * 2 for size in sizes[1:]]
    return [t.requires_grad_() for t in (head, *tails)]


@pytest.mark.parametrize("sizes", [(5, 4, 7), (9,)], ids=["adaptive", "full"])
@pytest.mark.parametrize("alpha, tau", [(0.3, 2.5), (0.0, 1.0), (1.0, 2.0)])
@pytest.mark.parametrize("chunk_rows", [1, 4, 100])
def test_chunked_loss_equals_reference(sizes, alpha, tau, chunk_rows):
    # Chunked values and closed-form gradients against autograd through the
    # reference distillation_loss, on 11 rows (no chunk size divides them evenly but 1).
    n, vocab_size = 11, sum(sizes)
    g = torch.Generator().manual_seed(7)
    teacher = torch.log_softmax(torch.randn(n, vocab_size, generator=g, dtype=torch.float64) * 2, dim=-1)
    target = torch.randint(0, vocab_size, (n,), generator=g)
    reference_inputs = clustered_logits(n, sizes, seed=5)
    chunked_inputs = clustered_logits(n, sizes, seed=5)

    expected = distillation_loss(clustered_log_probs(reference_inputs[0], reference_inputs[1:]),
                                 teacher, target, alpha, tau)
    expected[0].backward()
    actual = chunked_distillation_loss(chunked_inputs[0], chunked_inputs[1:], lambda a, b: teacher[a:b],
                                       target, alpha, tau, chunk_rows=chunk_rows)
    actual[0].backward()

    for a, e in zip(actual, expected):
        assert float(a) == pytest.approx(float(e), rel=1e-6, abs=1e-9)
    for a, e in zip(chunked_inputs, reference_inputs):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-6, atol=1e-9)


def test_chunked_loss_half_logits_under_loss_scale():
    # fp16 training: float16 logits are scored in float32, and the gradient stays float32
    # until backward multiplies it by the loss scale, then becomes float16.
    head, *tails = [t.detach().half().requires_grad_() for t in clustered_logits(6, (5, 4, 7), seed=4)]
    reference = [t.detach().float().requires_grad_() for t in (head, *tails)]
    teacher = torch.log_softmax(torch.randn(6, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    target = torch.tensor([0, 4, 5, 8, 9, 15])
    scale = 2.0**10

    loss, _, _ = chunked_distillation_loss(head, tails, lambda a, b: teacher[a:b], target, 0.5, 2.0, chunk_rows=4)
    loss.backward(torch.tensor(scale))
    expected, _, _ = chunked_distillation_loss(reference[0], reference[1:], lambda a, b: teacher[a:b], target, 0.5,
                                               2.0, chunk_rows=4)
    expected.backward()

    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    for a, e in zip((head, *tails), reference):
        assert a.grad.dtype == torch.float16
        torch.testing.assert_close(a.grad.float() / scale, e.grad, rtol=1e-3, atol=1e-6)


def test_chunked_loss_without_teacher_is_cross_entropy():
    head, *tails = clustered_logits(6, (5, 4, 7), seed=2)
    target = torch.tensor([0, 4, 5, 8, 9, 15])

    loss, nll, kl = chunked_distillation_loss(head, tails, None, target, 1.0, 2.0, chunk_rows=4)
    loss.backward()

    log_probs = clustered_log_probs(head.detach(), [t.detach() for t in tails])
    expected_nll = -log_probs[torch.arange(6), target].sum()
    assert float(nll) == pytest.approx(float(expected_nll), rel=1e-9)
    assert float(kl) == 0.0
    assert float(loss) == pytest.approx(float(expected_nll), rel=1e-9)
    assert head.grad is not None and all(t.grad is not None for t in tails)


def test_temper_full_softmax_equals_tempered_logits():
    logits = torch.randn(3, 11, generator=torch.Generator().manual_seed(2)) * 3

    tempered = temper(torch.log_softmax(logits, dim=-1), 2.0)

    assert torch.allclose(tempered, torch.log_softmax(logits / 2.0, dim=-1), atol=1e-6)


def test_adaptive_log_probs_match_fairseq(tiny_data, tiny_models):
    model, _ = load(tiny_models["teacher_adaptive"], tiny_data)
    module = model.decoder.adaptive_softmax
    module.eval()  # get_log_prob applies no input dropout
    x = torch.randn(2, 5, module.input_dim, generator=torch.Generator().manual_seed(3), requires_grad=True)

    ours = adaptive_softmax_log_probs(module, x.view(10, -1))
    with torch.no_grad():
        reference = module.get_log_prob(x, None).view(10, -1)
    ours.logsumexp(dim=-1).sum().backward()

    assert ours.shape == (10, module.vocab_size)
    assert torch.allclose(ours, reference, atol=1e-5)
    assert torch.allclose(ours.exp().sum(-1), torch.ones(10), atol=1e-5)
    assert x.grad is not None


# criterion against fairseq's criteria and NumPy


def test_alpha_one_equals_cross_entropy(tiny_data, tiny_models):
    model, task = load(tiny_models["student"], tiny_data)
    criterion = build_criterion(task, kd_alpha=1.0, kd_teacher_checkpoint=tiny_models["teacher_adaptive"])
    reference = CrossEntropyCriterion(task, sentence_avg=False)

    for sample in training_batches(task, 2):
        loss, sample_size, logged = criterion(model, sample)
        expected, expected_size, _ = reference(model, sample)

        assert sample_size == expected_size
        assert float(loss) == pytest.approx(float(expected), rel=1e-5)
        assert float(logged["nll_loss"]) == pytest.approx(float(expected), rel=1e-5)
        assert float(logged["kd_loss"]) > 0


def ignored_tail_nll(model, sample, pad):
    """Return the in-cluster NLL that fairseq's adaptive_loss leaves out.

    fairseq 0.12's adaptive_loss calls cross_entropy with ignore_index=pad on
    each tail's targets, which are word ids minus the cluster's first id.
    So for word ``cutoff[i] + pad`` it drops ``-log p(word | cluster i)`` and
    keeps only ``-log p(cluster i)``.
    """
    module = model.decoder.adaptive_softmax
    with torch.no_grad():
        features = model(**sample["net_input"])[0]
    target = sample["target"]
    total = 0.0
    for i, tail in enumerate(module.tail):
        selected = target.eq(module.cutoff[i] + pad)
        if selected.any():
            tail_log_probs = torch.log_softmax(tail(features[selected]), dim=-1)  # (m, V_i)
            total -= float(tail_log_probs[:, pad].sum())
    return total


def test_alpha_one_equals_adaptive_loss(tiny_data, tiny_models, datastore):
    model, task = load(tiny_models["teacher_adaptive"], tiny_data)
    criterion = build_criterion(task, kd_alpha=1.0, kd_datastore=datastore)
    reference = AdaptiveLoss(task, sentence_avg=False)
    pad = task.target_dictionary.pad()
    ignored = 0.0

    for sample in training_batches(task, 2):
        loss, sample_size, _ = criterion(model, sample)
        expected, expected_size, _ = reference(model, sample)
        missing = ignored_tail_nll(model, sample, pad)
        ignored += missing

        assert sample_size == expected_size
        assert float(loss) == pytest.approx(float(expected) + missing, rel=1e-5)
    assert ignored > 0, "expected the batches to contain a word that adaptive_loss scores in part"


def test_loss_matches_numpy_reference(tiny_data, tiny_models, datastore):
    model, task = load(tiny_models["student"], tiny_data)
    criterion = build_criterion(task, kd_alpha=0.3, kd_temperature=2.5, kd_datastore=datastore)
    stored = criterion.teacher.teacher
    starts = block_starts(task.dataset("train"))
    pad = task.target_dictionary.pad()

    for sample in training_batches(task, 2):
        loss, sample_size, logged = criterion(model, sample)

        with torch.no_grad():
            logits = model(**sample["net_input"])[0].double().numpy()  # (B, T, V)
        mask, rows = target_rows(sample["id"], sample["target"], pad, starts)
        mask = mask.numpy()
        target = sample["target"].numpy()[mask]
        student = log_softmax_np(logits[mask])
        teacher = head_log_probs_np(stored.head, np.asarray(stored.states[rows]))
        expected_loss, expected_nll, expected_kl = kd_loss_np(student, teacher, target, 0.3, 2.5)
        assert sample_size == mask.sum()
        assert float(logged["nll_loss"]) == pytest.approx(expected_nll, rel=1e-4)
        assert float(logged["kd_loss"]) == pytest.approx(expected_kl, rel=1e-4)
        assert float(loss) == pytest.approx(expected_loss, rel=1e-4)


def test_loss_backpropagates_to_student(tiny_data, tiny_models, datastore):
    model, task = load(tiny_models["teacher_adaptive"], tiny_data)
    criterion = build_criterion(task, kd_alpha=0.0, kd_datastore=datastore)
    sample = training_batches(task, 1)[0]

    loss, _, _ = criterion(model, sample)
    loss.backward()

    tail_weight = model.decoder.adaptive_softmax.tail[1][-1].weight
    assert tail_weight.grad is not None and tail_weight.grad.abs().sum() > 0


def test_eval_mode_loss_is_cross_entropy(tiny_data, tiny_models, datastore):
    model, task = load(tiny_models["student"], tiny_data)
    model.eval()
    offline = build_criterion(task, kd_datastore=datastore)
    online = build_criterion(task, kd_teacher_checkpoint=tiny_models["teacher_adaptive"])
    reference = CrossEntropyCriterion(task, sentence_avg=False)
    sample = training_batches(task, 1)[0]

    offline_loss, _, offline_logged = offline(model, sample)
    online_loss, _, online_logged = online(model, sample)
    expected, _, _ = reference(model, sample)

    assert float(offline_loss) == pytest.approx(float(expected), rel=1e-5)
    assert float(online_loss) == pytest.approx(float(expected), rel=1e-5)
    assert "kd_loss" not in offline_logged
    assert "kd_loss" in online_logged


# teacher sources


def test_online_offline_teachers_agree(tiny_data, tiny_models, datastore):
    model, task = load(tiny_models["student"], tiny_data)
    teacher_model, _ = load(tiny_models["teacher_adaptive"], tiny_data)
    teacher_model.eval()
    online = build_criterion(task, kd_teacher_checkpoint=tiny_models["teacher_adaptive"])
    offline = build_criterion(task, kd_datastore=datastore)
    pad = task.target_dictionary.pad()

    for sample in training_batches(task, 3):
        mask = sample["target"].ne(pad)
        gold = sample["target"][mask]

        online_log_probs = online.teacher_log_probs(model, sample, mask, gold)
        offline_log_probs = offline.teacher_log_probs(model, sample, mask, gold)
        with torch.no_grad():
            features = teacher_model(**sample["net_input"])[0]
            fairseq_log_probs = teacher_model.decoder.adaptive_softmax.get_log_prob(features, None)[mask]

        assert online_log_probs.shape == (int(mask.sum()), len(task.target_dictionary))
        assert torch.allclose(online_log_probs, fairseq_log_probs, atol=1e-4)
        # Stored states are float16. For these models the probabilities differ by about 1e-4.
        assert (online_log_probs.exp() - offline_log_probs.exp()).abs().max() < 1e-3


def test_wrong_row_raises(tiny_data, tiny_models, datastore):
    model, task = load(tiny_models["student"], tiny_data)
    criterion = build_criterion(task, kd_datastore=datastore)
    sample = training_batches(task, 1)[0]
    starts = block_starts(task.dataset("train"))
    _, rows = target_rows(sample["id"], sample["target"], task.target_dictionary.pad(), starts)
    targets = sample["target"][sample["target"].ne(task.target_dictionary.pad())].numpy()
    values = np.asarray(criterion.teacher.datastore.values)
    shifted = (rows + 1) % len(values)
    first = int(np.flatnonzero(values[shifted] != targets)[0])

    with pytest.raises(mf.DatastoreMismatchError) as excinfo:
        criterion.teacher.log_probs(shifted, targets, torch.device("cpu"))

    message = str(excinfo.value)
    assert f"row {shifted[first]} stores token {values[shifted[first]]}" in message
    assert f"is token {targets[first]}" in message


def test_row_out_of_range_raises(tiny_data, tiny_models, datastore):
    _, task = load(tiny_models["student"], tiny_data)
    criterion = build_criterion(task, kd_datastore=datastore)
    num_rows = criterion.teacher.num_rows

    with pytest.raises(mf.DatastoreMismatchError, match=f"rows span \\[0, {num_rows}\\] but it has {num_rows} rows"):
        criterion.teacher.log_probs(np.array([0, num_rows]), np.array([2, 2]), torch.device("cpu"))


def test_wrong_block_ids_raise(tiny_data, tiny_models, datastore):
    model, task = load(tiny_models["student"], tiny_data)
    criterion = build_criterion(task, kd_datastore=datastore)
    sample = training_batches(task, 1)[0]
    sample["id"] = (sample["id"] + 1) % len(task.dataset("train"))

    with pytest.raises(mf.DatastoreMismatchError, match="stores token"):
        criterion(model, sample)


def test_datastore_of_other_split_rejected(tiny_data, tiny_models, datastore):
    model, task = load(tiny_models["student"], tiny_data)
    task.load_dataset("valid")
    criterion = build_criterion(task, kd_datastore=datastore, train_subset="valid")
    itr = task.get_batch_iterator(dataset=task.dataset("valid"), max_tokens=128, seed=1)
    sample = next(iter(itr.next_epoch_itr(shuffle=False)))

    with pytest.raises(mf.DatastoreMismatchError, match="training split 'valid' has"):
        criterion(model, sample)


def test_missing_datastore_teacher_rejected(tiny_data, tiny_models, datastore):
    _, task = load(tiny_models["student"], tiny_data)

    with pytest.raises(mf.DatastoreMismatchError, match="'mlm'.*not found"):
        build_criterion(task, kd_datastore=datastore, kd_teacher="mlm")


def test_datastore_of_other_dictionary_rejected(tiny_data, datastore):
    other = Dictionary.load(os.path.join(tiny_data, "dict.txt"))
    other.add_symbol("unseen-word")

    with pytest.raises(mf.DatastoreMismatchError, match="dictionary is"):
        DatastoreTeacher(datastore, "causal", other)


def test_teacher_of_other_dictionary_rejected(tiny_data, tiny_models):
    state = checkpoint_utils.load_checkpoint_to_cpu(tiny_models["teacher_adaptive"])
    state["cfg"].task.data = tiny_data
    other = Dictionary.load(os.path.join(tiny_data, "dict.txt"))
    other.add_symbol("unseen-word")

    check_teacher_dictionary("teacher.pt", state["cfg"], Dictionary.load(os.path.join(tiny_data, "dict.txt")))
    with pytest.raises(ValueError, match="must share one dictionary"):
        check_teacher_dictionary("teacher.pt", state["cfg"], other)


def test_non_causal_teacher_rejected(tmp_path, tiny_data, tiny_models):
    _, task = load(tiny_models["student"], tiny_data)
    state = torch.load(tiny_models["teacher_adaptive"], map_location="cpu", weights_only=False)
    state["cfg"]["task"]["_name"] = "masked_lm"
    path = str(tmp_path / "masked.pt")
    torch.save(state, path)

    with pytest.raises(ValueError, match="trained with task masked_lm, expected a causal"):
        build_criterion(task, kd_teacher_checkpoint=path)


@pytest.mark.parametrize(
    "options,match",
    [
        ({}, "exactly one teacher source"),
        ({"kd_datastore": "d", "kd_teacher_checkpoint": "t.pt"}, "exactly one teacher source"),
        ({"kd_datastore": "d", "kd_alpha": 1.5}, "--kd-alpha must be in"),
        ({"kd_datastore": "d", "kd_temperature": 0.0}, "--kd-temperature must be > 0"),
    ],
)
def test_invalid_options_rejected(options, match):
    with pytest.raises(ValueError, match=match):
        DistillationCriterion(DistillationConfig(sentence_avg=False, train_subset="train", **options), task=None)


# fairseq-train


def fairseq_train(data, save_dir, extra):
    common = [flag for flag in COMMON_LM if flag != "--disable-validation"]
    cmd = [sys.executable, "-m", "fairseq_cli.train", data, "--save-dir", str(save_dir), "--user-dir", USER_DIR]
    cmd += common + ["--max-update", "3", "--log-interval", "1", "--criterion", "ppkd_distillation"] + extra
    result = run(cmd)
    return result.stdout + result.stderr


def test_fairseq_train_offline_teacher(tmp_path, tiny_data, datastore):
    output = fairseq_train(tiny_data, tmp_path, ["--kd-datastore", datastore, "--kd-teacher", "causal"])

    train_lines = [line for line in output.splitlines() if "| train_inner |" in line]
    valid_lines = [line for line in output.splitlines() if "| valid on 'valid' subset |" in line]
    assert len(train_lines) == 3
    assert all("kd_loss" in line and "nll_loss" in line for line in train_lines)
    assert valid_lines and "kd_loss" not in valid_lines[-1]
    state = torch.load(tmp_path / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert state["optimizer_history"][-1]["num_updates"] == 3
    assert state.get("criterion") is None  # the teacher is not saved with the student


def test_fairseq_train_online_adaptive_student(tmp_path, tiny_data, tiny_models):
    output = fairseq_train(
        tiny_data, tmp_path,
        ["--kd-teacher-checkpoint", tiny_models["teacher_adaptive"], "--kd-alpha", "0.2",
         "--adaptive-softmax-cutoff", "20,40", "--decoder-normalize-before"],
    )

    valid_lines = [line for line in output.splitlines() if "| valid on 'valid' subset |" in line]
    assert valid_lines and "kd_loss" in valid_lines[-1]
    state = torch.load(tmp_path / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert state["optimizer_history"][-1]["num_updates"] == 3
    assert state.get("criterion") is None  # the teacher is not saved with the student
    assert not any("teacher" in name for name in state["model"])


# scripts/train_kd.sh


def run_train_kd(*args):
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["DRY_RUN"] = "1"
    return subprocess.run(
        ["bash", os.path.join(REPO, "scripts", "train_kd.sh"), *args], env=env, capture_output=True, text=True
    )


def test_train_kd_script_dry_run(tmp_path):
    save_dir = tmp_path / "checkpoints"

    result = run_train_kd("wt2_cpu_student_kd", "data-bin/wt2", str(save_dir), "dstore/wt2", "causal",
                          "--max-update", "10")

    assert result.returncode == 0, result.stderr
    printed = result.stdout.strip()
    assert "--criterion ppkd_distillation" in printed
    assert "--kd-datastore dstore/wt2 --kd-teacher causal" in printed
    assert printed.endswith("--max-update 10")
    assert not save_dir.exists()


def test_train_kd_script_rejects_plain_config(tmp_path):
    result = run_train_kd("wt2_cpu_student", "data-bin/wt2", str(tmp_path / "ck"), "dstore/wt2", "causal")

    assert result.returncode == 2
    assert "criterion adaptive_loss" in result.stderr
