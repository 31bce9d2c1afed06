"""Independent captures from tiny fairseq models, for checking the plugin.

These helpers load checkpoints with fairseq's own loader, attach a forward
pre-hook of their own to the last decoder layer's ``fc1`` and read the
binarized corpus directly. None of them imports the plugin. Results are
cached per process, because both test_datastore.py and test_scoring.py use
the same captures.
"""

import functools

import numpy as np
import torch
from fairseq import checkpoint_utils
from fairseq.data import Dictionary, data_utils


def read_stream(data, split):
    """Return the split's token stream: every binarized line in order, as int64.

    fairseq-preprocess ends each line with the end-of-sentence token, so the
    lines concatenate into the stream the datastore rows follow.
    """
    dictionary = Dictionary.load(f"{data}/dict.txt")
    dataset = data_utils.load_indexed_dataset(f"{data}/{split}", dictionary)
    return np.concatenate([dataset[i].numpy() for i in range(len(dataset))]).astype(np.int64)


@functools.lru_cache(maxsize=None)
def load_model(checkpoint, data, tokens_per_sample=32):
    """Load ``checkpoint`` for evaluation; return ``(model, task)``."""
    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [checkpoint], arg_overrides={"data": data, "tokens_per_sample": tokens_per_sample},
    )
    model = models[0]
    model.eval()
    return model, task


@functools.lru_cache(maxsize=None)
def capture_student(checkpoint, data, split, tokens_per_sample=32, batch_size=8):
    """Run a student over a split's blocks and capture what the datastore needs.

    The blocks are fairseq's ``language_modeling`` blocks with
    ``--sample-break-mode none`` and no context window, which tile the token
    stream in block order, so concatenating each block's targets gives one
    entry per stream position.

    Returns:
        dict with ``keys`` (N, d) float32 inputs of the last layer's fc1,
        ``lm_log_probs`` (N,) float64 natural log ``P_LM(target)`` and
        ``targets`` (N,) int64.
    """
    model, task = load_model(checkpoint, data, tokens_per_sample)
    task.load_dataset(split)
    dataset = task.dataset(split)
    pad = task.target_dictionary.pad()
    inputs = []
    hook = model.decoder.layers[-1].fc1.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    keys, lm_log_probs, targets = [], [], []
    try:
        with torch.no_grad():
            for start in range(0, len(dataset), batch_size):
                ids = list(range(start, min(start + batch_size, len(dataset))))
                batch = dataset.collater([dataset[i] for i in ids])
                assert batch["id"].tolist() == ids, "the collater reordered the blocks"
                net_output = model(**batch["net_input"])
                lprobs = model.get_normalized_probs(net_output, log_probs=True)  # (B, T, V)
                target = batch["target"]  # (B, T)
                mask = target.ne(pad)
                x = inputs.pop().transpose(0, 1)  # fairseq layers run (T, B, C); now (B, T, C)
                keys.append(x[mask].float().numpy())
                lm_log_probs.append(lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)[mask].double().numpy())
                targets.append(target[mask].numpy())
    finally:
        hook.remove()
    return {
        "keys": np.concatenate(keys),
        "lm_log_probs": np.concatenate(lm_log_probs),
        "targets": np.concatenate(targets).astype(np.int64),
    }


@functools.lru_cache(maxsize=None)
def output_layer_matrices(checkpoint):
    """Read a causal LM's output layer from its checkpoint as NumPy arrays.

    Returns:
        ``("softmax", weight, bias)`` for a full softmax (bias may be None),
        or ``("adaptive", head_weight, tails, cutoff)`` for an adaptive
        softmax, in the form :mod:`reference` takes.
    """
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    params = {name: tensor.float().numpy() for name, tensor in state["model"].items() if tensor.is_floating_point()}
    prefix = "decoder.adaptive_softmax."
    if prefix + "head.weight" not in params:
        weight = params.get("decoder.output_projection.weight", params["decoder.embed_tokens.weight"])
        return ("softmax", weight, params.get("decoder.output_projection.bias"))
    head = params[prefix + "head.weight"]
    tails = []
    while f"{prefix}tail.{len(tails)}.0.weight" in params:
        i = len(tails)
        # Each tail is Sequential(Linear(d, d_i), Dropout, Linear(d_i, V_i)), both without bias.
        tails.append((params[f"{prefix}tail.{i}.0.weight"], params[f"{prefix}tail.{i}.2.weight"]))
    cutoff = [head.shape[0] - len(tails)]
    for _, output in tails:
        cutoff.append(cutoff[-1] + output.shape[0])
    return ("adaptive", head, tails, cutoff)
