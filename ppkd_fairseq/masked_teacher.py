"""Masked-LM teacher states: the final hidden state at each masked target.

A masked LM sees the target's left and right context with the target
replaced by ``<mask>``. For every stream position p, the state stored is the
input of the masked LM's output projection (RoBERTa's LM head after its
dense layer, activation and layer norm) at p, in a forward pass where p is
masked.

Windows. The token stream is cut into windows of ``window`` tokens (plus
the ``<s>`` that fairseq's masked_lm task prepends). Each window owns the
positions in its middle, ``context`` tokens away from both ends, so every
position but those near the stream's ends sees at least ``context`` tokens
on each side. Consecutive windows overlap by ``2 * context`` tokens.

Masking. The exact mode masks one position per forward pass, so the
context is the true text (``window - 2 * context`` passes per window). The
strided mode with stride s masks every s-th position of a window at once
and covers all positions in s passes: each target then sees its context
with 1/s of the other tokens also masked (s = 7 masks 14%, close to the 15%
the teacher was trained with). This costs s / (1 - 2 * context / window)
forward passes per token instead of window / (1 - 2 * context / window).
"""

import logging
import numpy as np
import torch
from tqdm import tqdm

from .teacher_head import softmax_head

logger = logging.getLogger(__name__)


def plan_windows(num_tokens, window, context):
    """Return ``(start, end, own_start, own_end)`` windows covering a stream.

    Args:
        num_tokens: N, tokens in the stream.
        window: tokens per window (without the prepended ``<s>``).
        context: minimum context on each side of an owned position.
    """
    if window <= 2 * context:
        raise ValueError(f"window {window} must exceed twice the context {context}")
    step = window - 2 * context
    plans = []
    own_start = 0
    while own_start < num_tokens:
        own_end = min(own_start + step, num_tokens)
        start = max(0, own_start - context)
        end = min(num_tokens, start + window)
        start = max(0, end - window)
        if own_end == num_tokens or end == num_tokens:
            own_end = num_tokens
        plans.append((start, end, own_start, own_end))
        own_start = own_end
    return plans


def masking_passes(plan, stride):
    """Yield, per forward pass, the stream positions to mask in a window.

    ``stride=None`` is the exact mode (one owned position per pass);
    otherwise every ``stride``-th stream position of the window is masked and
    the owned ones among them are collected.
    """
    start, end, own_start, own_end = plan
    if stride is None:
        for p in range(own_start, own_end):
            yield np.array([p]), np.array([p])
        return
    positions = np.arange(start, end)
    for r in range(stride):
        masked = positions[positions % stride == r]
        owned = masked[(masked >= own_start) & (masked < own_end)]
        if owned.size:
            yield masked, owned


def roberta_states(model, tokens):
    """Return (B, T, d_t) LM-head inputs of a fairseq RoBERTa for tokens (B, T)."""
    features, _ = model(tokens, features_only=True)  # (B, T, C)
    head = model.encoder.lm_head
    x = head.dense(features)
    x = head.activation_fn(x)
    return head.layer_norm(x)


def masked_teacher_head(model, vocab_size):
    """Return the teacher head over the first ``vocab_size`` words.

    fairseq's masked_lm task appends ``<mask>`` (and nothing else) to the
    shared dictionary, so the first ``vocab_size`` rows are the student's
    vocabulary and the distribution is renormalized without ``<mask>``.
    """
    head = model.encoder.lm_head
    return softmax_head(head.weight, head.bias, vocab_size=vocab_size)


@torch.no_grad()
def dump_masked_states(model, stream, bos, mask_idx, pad, writer, window=254, context=32, stride=7,
                       max_tokens=8192, shard_id=0, num_shards=1, device="cpu"):
    """Run the masked teacher over a token stream and write its states.

    Args:
        model: a fairseq RoBERTa model in eval mode.
        stream: (N,) int64 token ids of the split's token stream.
        bos, mask_idx, pad: special token ids of the teacher's dictionary.
        writer: a :class:`~ppkd_fairseq.dump.TeacherWriter`.
        window, context, stride: see the module docstring; ``stride=None``
            is the exact mode.
        max_tokens: tokens per forward batch.
        shard_id, num_shards: this process's share of the windows.
    """
    stream = torch.as_tensor(stream, dtype=torch.long)
    plans = plan_windows(len(stream), window, context)[shard_id::num_shards]
    rows_per_batch = max(1, max_tokens // (window + 1))
    batch_tokens, batch_rows, batch_slots = [], [], []

    def flush():
        if not batch_tokens:
            return
        width = max(len(t) for t in batch_tokens)
        tokens = torch.full((len(batch_tokens), width), pad, dtype=torch.long)
        for i, t in enumerate(batch_tokens):
            tokens[i, : len(t)] = t
        states = roberta_states(model, tokens.to(device)).float().cpu()  # (B, T, d_t)
        b_idx = torch.cat([torch.full((len(s),), i, dtype=torch.long) for i, s in enumerate(batch_slots)])
        t_idx = torch.cat([torch.as_tensor(s, dtype=torch.long) for s in batch_slots])
        rows = np.concatenate(batch_rows)
        writer.write(rows, states[b_idx, t_idx], stream[rows].numpy())
        batch_tokens.clear()
        batch_rows.clear()
        batch_slots.clear()

    for plan in tqdm(plans, desc="masked teacher windows", unit="window", mininterval=10):
        start, end = plan[0], plan[1]
        base = torch.cat([torch.tensor([bos]), stream[start:end]])
        for masked, owned in masking_passes(plan, stride):
            tokens = base.clone()
            tokens[torch.as_tensor(masked - start + 1)] = mask_idx
            batch_tokens.append(tokens)
            batch_rows.append(owned)
            batch_slots.append(owned - start + 1)
            if len(batch_tokens) >= rows_per_batch:
                flush()
    flush()


def forward_passes_per_token(window, context, stride):
    """Return the approximate forward-pass count per token (for logging)."""
    own = window - 2 * context
    passes = own if stride is None else stride
    return passes * (window + 1) / own
