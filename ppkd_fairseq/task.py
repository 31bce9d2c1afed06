"""The ``ppkd_language_modeling`` task: fairseq's LM task plus PP-KD.

Use it with stock ``fairseq-eval-lm --user-dir ppkd_fairseq --task
ppkd_language_modeling``. ``--ppkd-mode`` selects what the run does:

* ``eval``: score each target with the LM, the kNN-LM (``--ppkd-mu 1``) or
  PP-KD with stored teachers; without ``--ppkd-dstore`` it is the plain LM;
* ``dump``: write the datastore's keys and values over the evaluated split;
* ``dump_teacher``: write a causal teacher's final hidden states for the rows
  of an existing datastore (the teacher checkpoint is ``--path``);
* ``cache``: store each token's LM log-probability, neighbour distances and
  teacher log-probabilities in ``--ppkd-cache-dir`` for a T, mu and lambda
  sweep (see sweep_cache.py). The run reports the plain LM's perplexity.
"""

import argparse
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask

from . import hooks
from .help import add_options_to_help

logger = logging.getLogger(__name__)

# fairseq checkpoints of legacy models (RoBERTa, the published WikiText-103
# LMs) pickle their options as argparse.Namespace, which torch >= 2.6 rejects
# when loading with its default weights_only=True; fairseq 0.12 does not
# pass weights_only, so allow that one class.
torch.serialization.add_safe_globals([argparse.Namespace])

PPKD_MODE_CHOICES = ChoiceEnum(["eval", "dump", "dump_teacher", "cache"])
KEY_DTYPE_CHOICES = ChoiceEnum(["float16", "float32"])
DISTANCE_CHOICES = ChoiceEnum(["exact", "faiss"])
SEARCH_DEVICE_CHOICES = ChoiceEnum(["cpu", "gpu"])


@dataclass
class PPKDLanguageModelingConfig(LanguageModelingConfig):
    ppkd_mode: PPKD_MODE_CHOICES = field(
        default="eval",
        metadata={"help": "eval: score with the LM/kNN-LM/PP-KD; dump: write keys and values of the "
                          "evaluated split into --ppkd-dstore; dump_teacher: write the --path model's "
                          "final hidden states as teacher --ppkd-teacher-name; cache: store the inputs of the "
                          "mixture for a T, mu and lambda sweep into --ppkd-cache-dir"},
    )
    ppkd_dstore: Optional[str] = field(
        default=None,
        metadata={"help": "datastore folder (kNN-LM: --dstore-filename); without it, eval is the plain LM and "
                          "rejects the other scoring options"},
    )
    ppkd_k: int = field(default=1024, metadata={"help": "neighbours retrieved per token (kNN-LM: --k)"})
    ppkd_lambda: float = field(
        default=0.25,
        metadata={"help": "weight of P_kNN in the final mixture, in [0, 1] (kNN-LM: --lmbda); the paper's "
                          "best is 0.25 for the kNN-LM and 0.5 for PP-KD"},
    )
    ppkd_mu: float = field(
        default=1.0,
        metadata={"help": "weight of P_hard in P_kNN, in [0, 1]; 1 is the vanilla kNN-LM, the paper's "
                          "PP-KD best is 0.4"},
    )
    ppkd_temperature: float = field(
        default=10.0,
        metadata={"help": "T in exp(-d/T), in squared-L2 distance units (the paper's best is 10)"},
    )
    ppkd_probe: int = field(default=32, metadata={"help": "IVF lists probed per search (kNN-LM: --probe)"})
    ppkd_teachers: Optional[str] = field(
        default=None,
        metadata={"help": "comma-separated teacher names stored in the datastore; several are averaged "
                          "as probability distributions (the mixed teacher). Needed when --ppkd-mu < 1, and "
                          "unused, with a warning, at --ppkd-mu 1"},
    )
    ppkd_distance: DISTANCE_CHOICES = field(
        default="exact",
        metadata={"help": "exact: recompute squared L2 from the stored keys; faiss: use the index's "
                          "quantized distances (faster, less accurate; kNN-LM: --no-load-keys)"},
    )
    ppkd_search_device: SEARCH_DEVICE_CHOICES = field(
        default="cpu",
        metadata={"help": "where FAISS searches: cpu, or gpu (needs faiss-gpu and a GPU)"},
    )
    ppkd_exclude_own_row: bool = field(
        default=False,
        metadata={"help": "drop each token's own row from its neighbours, for evaluating on the split "
                          "the datastore was built from"},
    )
    ppkd_full_distribution: bool = field(
        default=False,
        metadata={"help": "mix full distributions over the vocabulary (k x V per token, slow) instead of "
                          "the target word only; the target's probability is the same"},
    )
    ppkd_analysis_out: Optional[str] = field(
        default=None,
        metadata={"help": "TSV file with, per evaluated token, the natural log of P_LM, P_hard, P_logit, "
                          "P_kNN and P and the number of neighbours whose value is the target"},
    )
    ppkd_neighbours_out: Optional[str] = field(
        default=None,
        metadata={"help": "folder for ids.npy and distances.npy, (tokens, k), of each token's neighbours, "
                          "indexed by token position in the split (-1 and inf where none)"},
    )
    ppkd_summary_out: Optional[str] = field(
        default=None,
        metadata={"help": "JSON file with the perplexity, token count and settings of the run"},
    )
    ppkd_key_dtype: KEY_DTYPE_CHOICES = field(
        default="float16",
        metadata={"help": "dtype of stored keys in dump mode; float16 halves the disk use (kNN-LM: "
                          "--dstore-fp16)"},
    )
    ppkd_teacher_name: str = field(
        default="causal", metadata={"help": "name of the teacher written by dump_teacher"},
    )
    ppkd_overwrite: bool = field(
        default=False, metadata={"help": "let dump replace a finished datastore in --ppkd-dstore, and "
                                         "dump_teacher a finished teacher of --ppkd-teacher-name"},
    )
    ppkd_cache_dir: Optional[str] = field(
        default=None,
        metadata={"help": "folder that --ppkd-mode cache writes: per token, the LM's target log-probability, "
                          "the --ppkd-k neighbours' distances and value matches, and the target "
                          "log-probability of every teacher in --ppkd-teachers (default: all stored; "
                          "'none' for no teacher)"},
    )
    ppkd_index_mmap: bool = field(
        default=False, metadata={"help": "memory-map the index file instead of reading it into RAM"},
    )


# Options that only the scoring pass of eval mode reads, so that they do
# nothing in eval mode without --ppkd-dstore.
SCORING_OPTIONS = (
    "ppkd_k", "ppkd_lambda", "ppkd_mu", "ppkd_temperature", "ppkd_probe", "ppkd_teachers", "ppkd_distance",
    "ppkd_search_device", "ppkd_exclude_own_row", "ppkd_full_distribution", "ppkd_analysis_out",
    "ppkd_neighbours_out", "ppkd_summary_out", "ppkd_index_mmap",
)


def check_options(args):
    """Raise ``ValueError`` for PP-KD options that are out of range or have no effect.

    Runs when the task is set up, before fairseq loads the checkpoint and the
    split. The checks that need the datastore stay in builder.py.
    """
    if args.ppkd_mode not in ("eval", "cache"):
        return
    from .builder import validate_settings

    validate_settings({
        "k": args.ppkd_k, "temperature": args.ppkd_temperature, "mu": args.ppkd_mu,
        "lam": args.ppkd_lambda, "probe": args.ppkd_probe,
    })
    if args.ppkd_mode == "eval" and not args.ppkd_dstore:
        # NOTE: an option given explicitly at its default value (--ppkd-mu 1)
        # is indistinguishable from an omitted one, so it passes unnoticed.
        defaults = PPKDLanguageModelingConfig.__dataclass_fields__
        unused = []
        for name in SCORING_OPTIONS:
            value = getattr(args, name)
            if value != defaults[name].default:
                flag = "--" + name.replace("_", "-")
                unused.append(flag if isinstance(value, bool) else f"{flag} {value}")
        if unused:
            raise ValueError(
                f"{', '.join(unused)}: without --ppkd-dstore, --ppkd-mode eval scores the plain LM and "
                f"ignores these options; pass --ppkd-dstore DATASTORE or drop them"
            )


class _FinishingIterator:
    """Pass batches through and call ``finish`` once they are exhausted."""

    def __init__(self, iterable, finish):
        self.iterable = iterable
        self.finish = finish
        self.n = getattr(iterable, "n", 0)

    def __len__(self):
        return len(self.iterable)

    def __iter__(self):
        yield from self.iterable
        self.finish()

    def __getattr__(self, name):
        return getattr(self.iterable, name)


@register_task("ppkd_language_modeling", dataclass=PPKDLanguageModelingConfig)
class PPKDLanguageModelingTask(LanguageModelingTask):
    """fairseq's language modeling with kNN-LM and PP-KD scoring or dumping."""

    def __init__(self, args, dictionary, output_dictionary=None, targets=None):
        super().__init__(args, dictionary, output_dictionary, targets)
        check_options(args)
        self.ppkd_models = []
        self.ppkd_split = None
        self.ppkd_handler = None

    def build_model(self, args, from_checkpoint=False):
        model = super().build_model(args, from_checkpoint)
        if self.args.ppkd_mode != "eval" or self.args.ppkd_dstore:
            capture = "final_state" if self.args.ppkd_mode == "dump_teacher" else "key"
            hooks.attach(model, None, capture)
            self.ppkd_models.append(model)
        return model

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)
        self.ppkd_split = split

    def eval_lm_dataloader(self, dataset, max_tokens=36000, batch_size=None, max_positions=None,
                           num_shards=1, shard_id=0, num_workers=1, data_buffer_size=10, context_window=0):
        itr = super().eval_lm_dataloader(
            dataset, max_tokens=max_tokens, batch_size=batch_size, max_positions=max_positions,
            num_shards=num_shards, shard_id=shard_id, num_workers=num_workers,
            data_buffer_size=data_buffer_size, context_window=context_window,
        )
        if not self.ppkd_models:
            return itr
        if len(self.ppkd_models) != 1:
            raise ValueError("PP-KD scores one model at a time; pass a single checkpoint to --path")
        from .builder import build_handler

        self.ppkd_handler = build_handler(
            self, self.ppkd_models[0], dataset, shard_id=shard_id, num_shards=num_shards,
            context_window=context_window,
        )
        self.ppkd_models[0]._ppkd_handler = self.ppkd_handler
        return _FinishingIterator(itr, self.ppkd_handler.finish)


add_options_to_help(
    PPKDLanguageModelingConfig,
    "PP-KD options (task ppkd_language_modeling; pass --task ppkd_language_modeling to use them)",
)
