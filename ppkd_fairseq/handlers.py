"""Per-batch work of the PP-KD task inside fairseq-eval-lm.

Each handler receives, for every batch, the model, its output, the sample
and a function returning the LM's log-probabilities, and returns the
log-probabilities fairseq-eval-lm should score: the LM's own for the dump
passes, and the PP-KD mixture for evaluation. ``finish`` runs once the
batch iterator is exhausted.
"""

import json
import logging
import math
import os
import time

import numpy as np
import torch

from . import manifest as mf
from . import mixture
from .retrieval import gather_rows, search
from .rows import target_rows
from .teacher_head import full_log_probs

logger = logging.getLogger(__name__)


class DumpKeysHandler:
    """Write each target's key (last FFN input) and value to the datastore."""

    def __init__(self, writer, starts, pad):
        self.writer = writer
        self.starts = starts
        self.pad = pad

    def score_batch(self, model, net_output, sample, base):
        target = sample["target"]
        mask, rows = target_rows(sample["id"], target, self.pad, self.starts)
        keys = model.ppkd_captured("key", target.shape)[mask]  # (n, d)
        self.writer.write(rows, keys.float().cpu().numpy(), target[mask].cpu().numpy())
        return base()

    def finish(self):
        self.writer.finish()


class DumpTeacherHandler:
    """Write each target's teacher state (final hidden state) to a teacher folder."""

    def __init__(self, writer, starts, pad):
        self.writer = writer
        self.starts = starts
        self.pad = pad

    def score_batch(self, model, net_output, sample, base):
        target = sample["target"]
        mask, rows = target_rows(sample["id"], target, self.pad, self.starts)
        states = model.ppkd_captured("final_state", target.shape)[mask]  # (n, d_t)
        self.writer.write(rows, states.float().cpu(), target[mask].cpu().numpy())
        return base()

    def finish(self):
        self.writer.finish()


class ScoreHandler:
    """Replace each target's LM log-probability with the PP-KD mixture.

    Args:
        datastore: the opened :class:`~ppkd_fairseq.datastore.Datastore`.
        index: the FAISS index over its keys.
        teachers: list of :class:`TeacherStore` (empty for the kNN-LM).
        settings: dict with ``k, temperature, mu, lam, exact_distance,
            exclude_own_row, full_distribution``.
        starts: block starts of the evaluated split (see rows.py).
        pad: the padding index.
        dictionary: for the word column of the analysis file.
        num_positions: tokens in the evaluated split (rows of the
            neighbours arrays).
        analysis_path: optional TSV of per-token probabilities.
        neighbours_dir: optional folder for retrieved ids and distances.
        summary_path: optional JSON summary.
        split: name of the evaluated split, for the summary.
        unused_teachers: names of teachers given but not mixed in (at
            mu = 1), listed in the summary.

    The caller checks the student against the datastore (see builder.py).
    The analysis TSV and the neighbour arrays are written under
    ``PATH.partial`` names and renamed by :meth:`finish`, so that a run that
    fails leaves earlier outputs as they were.
    """

    def __init__(self, datastore, index, teachers, settings, starts, pad, dictionary, num_positions,
                 analysis_path=None, neighbours_dir=None, summary_path=None, split=None, unused_teachers=()):
        self.datastore = datastore
        self.index = index
        self.teachers = teachers
        self.settings = settings
        self.starts = starts
        self.pad = pad
        self.dictionary = dictionary
        self.num_positions = num_positions
        self.split = split
        self.unused_teachers = list(unused_teachers)
        self.total_log_prob = 0.0
        self.count = 0
        self.no_neighbour = 0
        self.infinite = 0
        self.search_seconds = 0.0
        self.started = time.time()
        self.summary_path = summary_path
        self.analysis = None
        self.partial_outputs = []  # (partial path, final path), renamed by finish
        if analysis_path:
            os.makedirs(os.path.dirname(os.path.abspath(analysis_path)), exist_ok=True)
            self.analysis = open(self._partial(analysis_path), "w")
            self.analysis.write(
                "position\ttarget\tword\tlog_p_lm\tlog_p_hard\tlog_p_logit\tlog_p_knn\tlog_p\tn_match\tn_valid\n"
            )
        self.neighbour_ids = self.neighbour_distances = None
        if neighbours_dir:
            os.makedirs(neighbours_dir, exist_ok=True)
            k = settings["k"]
            self.neighbour_ids = np.lib.format.open_memmap(
                self._partial(os.path.join(neighbours_dir, "ids.npy")), mode="w+", dtype=np.int64,
                shape=(num_positions, k))
            self.neighbour_ids[:] = -1
            self.neighbour_distances = np.lib.format.open_memmap(
                self._partial(os.path.join(neighbours_dir, "distances.npy")), mode="w+", dtype=np.float32,
                shape=(num_positions, k))
            self.neighbour_distances[:] = np.inf

    def _partial(self, path):
        """Return the name ``path`` is written under until :meth:`finish` renames it."""
        partial = path + ".partial"
        self.partial_outputs.append((partial, path))
        return partial

    def score_batch(self, model, net_output, sample, base):
        s = self.settings
        target = sample["target"]
        mask, positions = target_rows(sample["id"], target, self.pad, self.starts)
        queries = model.ppkd_captured("key", target.shape)[mask].float().cpu().numpy()  # (n, d)
        targets = target[mask].cpu()  # (n,)
        lprobs = base(target_only=not s["full_distribution"])  # (B, T, V)
        # Index the target entries directly, because lprobs[mask] copies n x V floats.
        batch_index, time_index = mask.nonzero(as_tuple=True)  # (n,) each, in lprobs[mask]'s order
        target_index = targets.to(lprobs.device)
        lm_target = lprobs[batch_index, time_index, target_index].cpu()

        t0 = time.perf_counter()
        nb = search(
            self.index, queries, s["k"], keys=self.datastore.keys,
            exclude_rows=positions if s["exclude_own_row"] else None, exact=s["exact_distance"],
        )
        self.search_seconds += time.perf_counter() - t0
        valid = torch.from_numpy(nb.valid)
        log_w = mixture.log_weights(torch.from_numpy(nb.distances), s["temperature"], valid)
        values = torch.from_numpy(gather_rows(self.datastore.values, nb.ids, nb.valid).astype(np.int64))
        value_match = (values == targets.unsqueeze(1)) & valid
        teacher_lp = None
        if s["mu"] < 1.0:
            teacher_lp = self.teacher_target_log_probs(nb, targets)
        parts = mixture.ppkd_target_log_prob(lm_target, log_w, value_match, teacher_lp, s["mu"], s["lam"])
        final = parts["final"]

        if s["full_distribution"]:
            full = self.full_distribution(lprobs[mask].cpu(), log_w, values, nb, parts)
            lprobs[mask] = full.to(lprobs.dtype).to(lprobs.device)
        else:
            lprobs[batch_index, time_index, target_index] = final.to(lprobs.dtype).to(lprobs.device)

        self.record(positions, targets, parts, value_match, nb)
        return lprobs

    def teacher_target_log_probs(self, nb, targets):
        per_teacher = [
            teacher.neighbour_log_probs(nb.ids, nb.valid, targets) for teacher in self.teachers
        ]  # each (n, k)
        if len(per_teacher) == 1:
            return per_teacher[0]
        return mixture.average_teachers(per_teacher)

    def full_distribution(self, lm_full, log_w, values, nb, parts):
        s = self.settings
        vocab = lm_full.shape[-1]
        hard = mixture.hard_full_log_probs(log_w, values, vocab)  # (n, V)
        if s["mu"] < 1.0:
            logit = torch.empty_like(hard)
            for i in range(hard.shape[0]):
                ids = nb.ids[i][nb.valid[i]]
                if ids.size == 0:
                    logit[i] = float("-inf")
                    continue
                per_teacher = [full_log_probs(t.head, torch.from_numpy(np.asarray(t.states[ids])))
                               for t in self.teachers]  # each (k_i, V)
                teacher = per_teacher[0] if len(per_teacher) == 1 else mixture.average_teachers(per_teacher)
                logit[i] = torch.logsumexp(log_w[i, nb.valid[i]].unsqueeze(-1) + teacher, dim=0)
        else:
            logit = torch.full_like(hard, float("-inf"))
        knn = mixture.mix(hard, logit, s["mu"])
        final = mixture.mix(knn, lm_full, s["lam"])
        found = mixture.has_neighbours(log_w)
        return torch.where(found.unsqueeze(-1), final, lm_full)

    def record(self, positions, targets, parts, value_match, nb):
        final = parts["final"].double()
        finite = torch.isfinite(final)
        self.infinite += int((~finite).sum())
        self.total_log_prob += float(final[finite].sum())
        self.count += int(final.numel())
        self.no_neighbour += int((~torch.from_numpy(nb.valid).any(-1)).sum())
        if self.analysis is not None:
            n_match = value_match.sum(-1).tolist()
            n_valid = nb.valid.sum(-1).tolist()
            cols = [parts[name].tolist() for name in ("lm", "hard", "logit", "knn", "final")]
            lines = []
            for i, position in enumerate(positions.tolist()):
                word = self.dictionary[int(targets[i])]
                values = "\t".join(repr(float(c[i])) for c in cols)
                lines.append(f"{position}\t{int(targets[i])}\t{word}\t{values}\t{n_match[i]}\t{n_valid[i]}\n")
            self.analysis.write("".join(lines))
        if self.neighbour_ids is not None:
            self.neighbour_ids[positions] = nb.ids
            self.neighbour_distances[positions] = nb.distances

    def summary(self):
        s = self.settings
        if self.count and not self.infinite:
            loss = -self.total_log_prob / self.count / math.log(2)
            perplexity = 2 ** loss
        else:
            loss = perplexity = float("inf") if self.count else None
        elapsed = time.time() - self.started
        return {
            "perplexity": perplexity,
            "loss_base2": loss,
            "tokens": self.count,
            "tokens_without_neighbours": self.no_neighbour,
            "tokens_with_zero_probability": self.infinite,
            "split": self.split,
            "settings": {
                "k": s["k"], "temperature": s["temperature"], "mu": s["mu"], "lambda": s["lam"],
                "teachers": [t.name for t in self.teachers], "unused_teachers": self.unused_teachers,
                "probe": s["probe"],
                "distance": "exact" if s["exact_distance"] else "faiss",
                "exclude_own_row": s["exclude_own_row"],
                "full_distribution": s["full_distribution"],
            },
            "datastore": {"folder": self.datastore.folder, "datastore_id": self.datastore.manifest["datastore_id"],
                          "num_rows": self.datastore.num_rows},
            "seconds": round(elapsed, 2),
            "search_seconds": round(self.search_seconds, 2),
        }

    def finish(self):
        if self.analysis is not None:
            self.analysis.close()
        if self.neighbour_ids is not None:
            self.neighbour_ids.flush()
            self.neighbour_distances.flush()
        for partial, path in self.partial_outputs:
            os.replace(partial, path)
        summary = self.summary()
        if self.infinite:
            logger.warning(
                "%d tokens got probability 0 (no neighbour shares their value and lambda = 1 or the "
                "teacher gives 0); fairseq-eval-lm skips them in its perplexity, the summary counts "
                "them and reports an infinite perplexity", self.infinite)
        if self.no_neighbour:
            logger.warning("%d tokens had no valid neighbour and were scored by the LM alone", self.no_neighbour)
        logger.info("PP-KD summary: %s", json.dumps(summary))
        if self.summary_path:
            mf.write_json_atomic(self.summary_path, summary)
