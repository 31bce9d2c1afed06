"""Teacher distributions for logit distillation, from a checkpoint or a datastore.

Both sources give the causal teacher's final hidden states (n, d_t) for
the n non-padding targets of a training batch, and its output layer, which
:func:`teacher_head.full_log_probs` turns into the full log-distribution
(n, V) at temperature 1:

* :class:`CheckpointTeacher` runs a frozen fairseq LM on each batch;
* :class:`DatastoreTeacher` reads the states that ``--ppkd-mode
  dump_teacher`` stored for the training split, one row per token.

A state depends on the context the teacher saw. So the two sources agree,
up to the float16 rounding of stored states, when the dump cut the training
split into the blocks that training uses: the same ``--tokens-per-sample``
and ``--sample-break-mode``, and no context window.
"""

import logging
import os

import numpy as np
import torch
from fairseq import checkpoint_utils
from fairseq.data import Dictionary
from fairseq.models import FairseqLanguageModel

from . import manifest as mf
from .builder import causal_teacher_head
from .datastore import Datastore
from .teacher_head import TeacherHead, full_log_probs

logger = logging.getLogger(__name__)

CAUSAL_TASKS = ("language_modeling", "ppkd_language_modeling")


def head_to(head, device):
    """Return ``head`` with every tensor on ``device`` (no copy when already there)."""
    return TeacherHead(
        weight=head.weight.to(device),
        bias=head.bias.to(device),
        word_cluster=head.word_cluster.to(device),
        cluster_logit_weight=head.cluster_logit_weight.to(device),
        tail_weights=[w.to(device) for w in head.tail_weights],
        tail_ranges=list(head.tail_ranges),
        head_size=head.head_size,
    )


class CheckpointTeacher:
    """A frozen causal teacher loaded from a fairseq checkpoint.

    The model is built by the training task, so its embedding and output
    layer are sized by the task's dictionary. It is a plain attribute, not a
    submodule of the criterion, so fairseq neither optimizes it nor saves it
    into the student's checkpoints.
    """

    def __init__(self, path, task):
        self.path = path
        dictionary = task.target_dictionary
        state = checkpoint_utils.load_checkpoint_to_cpu(path)
        cfg = state["cfg"]
        teacher_task = cfg.task.get("_name")
        if teacher_task not in CAUSAL_TASKS:
            raise ValueError(
                f"teacher checkpoint {path} was trained with task {teacher_task}, expected a causal "
                f"language model (task {' or '.join(CAUSAL_TASKS)})"
            )
        check_teacher_dictionary(path, cfg, dictionary)

        try:
            models, _ = checkpoint_utils.load_model_ensemble([path], task=task, state=state)
        except RuntimeError as error:
            if "size mismatch" not in str(error):
                raise
            raise ValueError(
                f"teacher checkpoint {path} does not fit this task's dictionary of {len(dictionary)} "
                f"symbols, so it was trained with another one. Distill from a teacher binarized with "
                f"this data-bin's dict.txt (fairseq-preprocess --srcdict). Details: {error}"
            ) from error
        model = models[0]
        if not isinstance(model, FairseqLanguageModel):
            raise ValueError(
                f"teacher checkpoint {path} contains a {type(model).__name__}, expected a causal fairseq "
                f"language model (a FairseqLanguageModel)"
            )

        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.head = causal_teacher_head(model, len(dictionary))
        logger.info(
            "loaded teacher %s (%s, %d parameters, %s output layer)", path, type(model).__name__,
            sum(p.numel() for p in model.parameters()),
            "adaptive softmax" if model.decoder.adaptive_softmax is not None else "full softmax",
        )

    def _move_to(self, device, dtype):
        parameter = next(self.model.parameters())
        if parameter.device != device or parameter.dtype != dtype:
            self.model.to(device=device, dtype=dtype)
        if self.head.weight.device != device:
            self.head = head_to(self.head, device)

    @torch.no_grad()
    def states(self, net_input, mask, device, dtype):
        """Return the teacher's (n, d_t) final hidden states at the n masked positions.

        Args:
            net_input: the batch's ``net_input`` (``src_tokens`` (B, T), ...).
            mask: (B, T) bool, True at the non-padding targets.
            device, dtype: where and in which dtype the student runs; the
                teacher moves there on first use.
        """
        self._move_to(device, dtype)
        features, _ = self.model(**net_input, features_only=True)  # (B, T, d_t)
        return features[mask]

    def log_probs(self, net_input, mask, device, dtype):
        """Return (n, V) float32 log-probabilities of the n masked positions (see :meth:`states`)."""
        return full_log_probs(self.head, self.states(net_input, mask, device, dtype))


def check_teacher_dictionary(path, cfg, dictionary):
    """Compare the dictionary a teacher was trained with to ``dictionary``.

    A checkpoint stores the path of its training data, not its dictionary,
    so the check reads ``dict.txt`` from that path when it still exists.
    Otherwise only the vocabulary size is checked, when the weights load.
    """
    data = str(cfg.task.get("data", "") or "")
    dict_path = os.path.join(data.split(os.pathsep)[0], "dict.txt") if data else ""
    if not dict_path or not os.path.isfile(dict_path):
        logger.warning(
            "teacher %s was trained on %r, whose dict.txt is not found here, so only the teacher's "
            "vocabulary size is checked against this task's dictionary", path, data,
        )
        return
    expected = mf.dictionary_fingerprint(dictionary)
    actual = mf.dictionary_fingerprint(Dictionary.load(dict_path))
    if actual != expected:
        raise ValueError(
            f"teacher checkpoint {path} was trained with {dict_path} ({actual['size']} symbols, "
            f"sha256 {actual['sha256'][:12]}), but this task's dictionary has {expected['size']} "
            f"symbols with sha256 {expected['sha256'][:12]}. Teacher and student must share one "
            f"dictionary: binarize the teacher's data with fairseq-preprocess --srcdict."
        )


class DatastoreTeacher:
    """A teacher's stored states for the rows of a PP-KD datastore.

    Row i of the datastore is the i-th token of the split the datastore was
    dumped from, so the datastore must cover the training split.
    """

    def __init__(self, folder, name, dictionary):
        self.folder = folder
        self.datastore = Datastore.open(folder, dictionary=dictionary)
        self.teacher = self.datastore.open_teacher(name)
        self.head = self.teacher.head
        logger.info(
            "distilling from teacher %r of datastore %s: %d rows of %d-dim states",
            name, folder, self.datastore.num_rows, self.head.dim,
        )

    @property
    def num_rows(self):
        return self.datastore.num_rows

    def check_rows(self, rows, targets):
        """Raise unless the datastore's value at every row equals its target.

        Args:
            rows: (n,) int64 datastore rows.
            targets: (n,) int64 gold word ids.
        """
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise mf.DatastoreMismatchError(
                f"datastore {self.folder}: rows span [{rows.min()}, {rows.max()}] but it has "
                f"{self.num_rows} rows; it was dumped from another split than the training split"
            )
        values = np.asarray(self.datastore.values[rows], dtype=np.int64)
        wrong = np.flatnonzero(values != targets)
        if wrong.size:
            i = int(wrong[0])
            raise mf.DatastoreMismatchError(
                f"datastore {self.folder}: row {int(rows[i])} stores token {int(values[i])} but the "
                f"training target mapped to it is token {int(targets[i])} ({wrong.size} of {rows.size} "
                f"targets in this batch differ). The datastore was dumped from another text than the "
                f"training split; dump it with fairseq-eval-lm --gen-subset train over this data-bin."
            )

    def states(self, rows, targets, device):
        """Return the teacher's stored (n, d_t) states at the given rows.

        Args:
            rows: (n,) int64 datastore rows of the targets.
            targets: (n,) int64 gold word ids, checked against the stored values.
            device: where to compute; the head moves there on first use.
        """
        targets = np.asarray(targets, dtype=np.int64)
        self.check_rows(rows, targets)
        if self.head.weight.device != device:
            self.head = head_to(self.head, device)
        return torch.from_numpy(np.ascontiguousarray(self.teacher.states[rows])).to(device)

    def log_probs(self, rows, targets, device):
        """Return (n, V) float32 teacher log-probabilities at the given rows (see :meth:`states`)."""
        return full_log_probs(self.head, self.states(rows, targets, device))
