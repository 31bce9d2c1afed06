"""The ``ppkd_distillation`` criterion: conventional logit distillation.

The baseline that plug-and-play knowledge distillation is compared with:
the student is trained with

    loss = alpha * CE(gold) + (1 - alpha) * tau^2 * KL(p_teacher^tau || p_student^tau)

(see :mod:`ppkd_fairseq.distillation`). Select a teacher source with exactly
one of:

* ``--kd-teacher-checkpoint PATH``: a frozen causal fairseq LM over the
  same dictionary, run on every batch;
* ``--kd-datastore DIR --kd-teacher NAME``: the teacher states that
  ``fairseq-eval-lm --ppkd-mode dump_teacher`` stored for the training split.

Both the student and the teacher are scored over the full vocabulary, the
cost that ``adaptive_loss`` avoids for an adaptive-softmax student, but the
only way to compare the two distributions exactly. The loss is computed in
chunks of rows with a closed-form gradient
(:func:`~ppkd_fairseq.distillation.chunked_distillation_loss`), so a batch
holds one (tokens, V) matrix, the gradient, instead of several.

On validation, where fairseq puts the model in evaluation mode, ``loss`` is
the gold cross-entropy alone, so that ``checkpoint_best.pt`` is the one with
the best validation perplexity. There, ``kd_loss`` is logged only for a
checkpoint teacher, because a datastore covers the training split only.
"""

import logging
import math
from dataclasses import dataclass, field
from typing import Optional

from fairseq import utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics
from omegaconf import II

from . import manifest as mf
from .distillation import adaptive_softmax_logits, chunked_distillation_loss
from .distillation_teachers import CheckpointTeacher, DatastoreTeacher
from .rows import block_starts, num_stream_tokens, target_rows
from .teacher_head import full_log_probs

logger = logging.getLogger(__name__)


@dataclass
class DistillationConfig(FairseqDataclass):
    kd_alpha: float = field(
        default=0.5,
        metadata={"help": "weight of the gold cross-entropy, in [0, 1]; the KL term gets 1 - alpha. "
                          "0.5 is the default of Hugging Face's DistilBERT/DistilGPT-2 training script "
                          "(--alpha_clm 0.5 with --alpha_ce 0.5)"},
    )
    kd_temperature: float = field(
        default=2.0,
        metadata={"help": "temperature tau > 0 applied to teacher and student in the KL term, which is "
                          "scaled by tau^2; 2.0 is the default of Hugging Face's DistilBERT/DistilGPT-2 "
                          "training script"},
    )
    kd_teacher_checkpoint: Optional[str] = field(
        default=None,
        metadata={"help": "checkpoint of a causal fairseq LM over this data-bin's dictionary, run frozen "
                          "on every batch (the online teacher); excludes --kd-datastore"},
    )
    kd_datastore: Optional[str] = field(
        default=None,
        metadata={"help": "PP-KD datastore folder dumped from the training split, whose stored teacher "
                          "states give the teacher distributions (the offline teacher); excludes "
                          "--kd-teacher-checkpoint"},
    )
    kd_teacher: str = field(
        default="causal",
        metadata={"help": "name of the teacher inside --kd-datastore (its --ppkd-teacher-name when it "
                          "was dumped); default causal"},
    )
    sentence_avg: bool = II("optimization.sentence_avg")
    train_subset: str = II("dataset.train_subset")


@register_criterion("ppkd_distillation", dataclass=DistillationConfig)
class DistillationCriterion(FairseqCriterion):
    """Gold cross-entropy plus the tempered KL to a causal teacher."""

    def __init__(self, cfg, task):
        super().__init__(task)
        validate_config(cfg)
        self.alpha = float(cfg.kd_alpha)
        self.temperature = float(cfg.kd_temperature)
        self.sentence_avg = cfg.sentence_avg
        self.train_subset = cfg.train_subset
        dictionary = task.target_dictionary
        if cfg.kd_teacher_checkpoint:
            self.teacher = CheckpointTeacher(cfg.kd_teacher_checkpoint, task)
        else:
            self.teacher = DatastoreTeacher(cfg.kd_datastore, cfg.kd_teacher, dictionary)
        self._starts_of = (None, None)  # (dataset, its block starts)

    def _training_block_starts(self):
        """Return the block starts of the training dataset, checked against the datastore."""
        dataset = self.task.dataset(self.train_subset)
        if self._starts_of[0] is not dataset:
            num_rows = num_stream_tokens(dataset)
            if num_rows != self.teacher.num_rows:
                raise mf.DatastoreMismatchError(
                    f"training split {self.train_subset!r} has {num_rows} tokens but datastore "
                    f"{self.teacher.folder} has {self.teacher.num_rows} rows "
                    f"({self.teacher.datastore.manifest.get('corpus')}). Dump the datastore and its "
                    f"teacher from this split (fairseq-eval-lm --gen-subset {self.train_subset})."
                )
            self._starts_of = (dataset, block_starts(dataset))
        return self._starts_of[1]

    def teacher_scorer(self, model, sample, mask, target):
        """Return ``score(start, stop)``: the teacher's log-probabilities of targets ``start:stop``.

        The teacher's states for the batch's n masked targets are computed
        (or read) once. ``score`` maps a slice of them through the output
        layer to a (stop - start, V) float32 matrix, so the loss never
        builds the teacher's whole (n, V) distribution.
        """
        if isinstance(self.teacher, CheckpointTeacher):
            parameter = next(model.parameters())
            states = self.teacher.states(sample["net_input"], mask, parameter.device, parameter.dtype)
        else:
            _, rows = target_rows(sample["id"], sample["target"], self.padding_idx, self._training_block_starts())
            states = self.teacher.states(rows, target.cpu().numpy(), target.device)  # (n, d_t)
        head = self.teacher.head
        return lambda start, stop: full_log_probs(head, states[start:stop])

    def teacher_log_probs(self, model, sample, mask, target):
        """Return the teacher's (n, V) log-probabilities for the masked targets."""
        return self.teacher_scorer(model, sample, mask, target)(0, len(target))

    def forward(self, model, sample, reduce=True):
        """Compute the loss of a batch.

        Returns ``(loss, sample_size, logging_output)`` as every fairseq
        criterion does. The loss is summed over tokens; ``reduce=False`` is
        not supported.
        """
        if not reduce:
            raise NotImplementedError("ppkd_distillation returns summed losses only (reduce=True)")
        net_output = model(**sample["net_input"])
        target = model.get_targets(sample, net_output)  # (B, T)
        mask = target.ne(self.padding_idx)  # (B, T)
        gold = target[mask]  # (n,)
        head_logits, tail_logits = student_logits(model, net_output, mask)

        teacher = None
        if model.training or isinstance(self.teacher, CheckpointTeacher):
            teacher = self.teacher_scorer(model, sample, mask, gold)
        kd_total, nll, kl = chunked_distillation_loss(
            head_logits, tail_logits, teacher, gold, self.alpha, self.temperature
        )
        if teacher is None:
            kl = None
        loss = kd_total if model.training else nll

        ntokens = int(mask.sum())
        sample_size = target.size(0) if self.sentence_avg else ntokens
        logging_output = {
            "loss": loss.data,
            "nll_loss": nll.data,
            "ntokens": ntokens,
            "nsentences": target.size(0),
            "sample_size": sample_size,
        }
        if kl is not None:
            logging_output["kd_loss"] = kl.data
            logging_output["kd_ntokens"] = ntokens
        return loss, sample_size, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        """Log ``loss``, ``nll_loss`` and ``kd_loss`` in bits, and the perplexity."""
        loss_sum = utils.item(sum(log.get("loss", 0) for log in logging_outputs))
        nll_sum = utils.item(sum(log.get("nll_loss", 0) for log in logging_outputs))
        kd_sum = utils.item(sum(log.get("kd_loss", 0) for log in logging_outputs))
        ntokens = utils.item(sum(log.get("ntokens", 0) for log in logging_outputs))
        kd_ntokens = utils.item(sum(log.get("kd_ntokens", 0) for log in logging_outputs))
        sample_size = utils.item(sum(log.get("sample_size", 0) for log in logging_outputs))

        metrics.log_scalar("loss", loss_sum / sample_size / math.log(2), sample_size, round=3)
        metrics.log_scalar("nll_loss", nll_sum / ntokens / math.log(2), ntokens, round=3)
        if kd_ntokens:
            metrics.log_scalar("kd_loss", kd_sum / kd_ntokens / math.log(2), kd_ntokens, round=3)
        metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True


def validate_config(cfg):
    """Raise ``ValueError`` naming the option when a setting is invalid."""
    if not 0.0 <= cfg.kd_alpha <= 1.0:
        raise ValueError(f"--kd-alpha must be in [0, 1], got {cfg.kd_alpha}")
    if not cfg.kd_temperature > 0:
        raise ValueError(f"--kd-temperature must be > 0, got {cfg.kd_temperature}")
    if bool(cfg.kd_teacher_checkpoint) == bool(cfg.kd_datastore):
        raise ValueError(
            "--criterion ppkd_distillation needs exactly one teacher source: --kd-teacher-checkpoint "
            "PATH (a causal LM run on every batch) or --kd-datastore DIR with --kd-teacher NAME "
            f"(stored states); got --kd-teacher-checkpoint {cfg.kd_teacher_checkpoint!r} and "
            f"--kd-datastore {cfg.kd_datastore!r}"
        )


def student_logits(model, net_output, mask):
    """Return the student's logits at the masked positions, by cluster.

    Returns:
        ``(head_logits, tail_logits)`` as
        :func:`~ppkd_fairseq.distillation.adaptive_softmax_logits` returns
        them for an adaptive-softmax student: (n, c_0 + n_tail) and a list
        of (n, V_i). Any other fairseq LM gives its (n, V) output logits and
        an empty list.
    """
    adaptive_softmax = getattr(model.decoder, "adaptive_softmax", None)
    if adaptive_softmax is not None:
        return adaptive_softmax_logits(adaptive_softmax, net_output[0][mask])
    return net_output[0][mask], []
