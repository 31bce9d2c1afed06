"""Map the targets of a fairseq LM batch to datastore rows.

A split's token stream is the binarized split read in order, one
end-of-sentence token after each line. fairseq's ``TokenBlockDataset`` cuts
that stream into blocks; block ``b`` covers stream positions
``[start_b, end_b)`` and its targets are exactly those tokens, in order,
whatever the break mode, ``--tokens-per-sample`` or ``--context-window``
(the window only prepends context whose targets are padding). So the j-th
non-padding target of a sample with id ``b`` is stream position
``start_b + j``, which is its datastore row.
"""

import numpy as np
import torch
from fairseq.data import MonolingualDataset, TokenBlockDataset


def find_token_blocks(dataset):
    """Return the ``TokenBlockDataset`` inside a language-modeling dataset."""
    seen = dataset
    for _ in range(8):
        if isinstance(seen, TokenBlockDataset):
            return seen
        seen = getattr(seen, "dataset", None)
        if seen is None:
            break
    raise TypeError(
        f"cannot map {type(dataset).__name__} to token positions: expected a language_modeling "
        f"dataset built on a TokenBlockDataset"
    )


def block_starts(dataset):
    """Return (num_blocks,) int64 stream offsets of each block's first target."""
    blocks = find_token_blocks(dataset)
    return np.asarray(blocks.slice_indices, dtype=np.int64)[:, 0].copy()


def num_stream_tokens(dataset):
    """Return the number of tokens in the split's token stream (rows N)."""
    blocks = find_token_blocks(dataset)
    return int(np.asarray(blocks.slice_indices, dtype=np.int64)[:, 1].max())


def target_rows(sample_ids, target, pad, starts):
    """Return the datastore row of every non-padding target.

    Args:
        sample_ids: (B,) block ids (``sample["id"]``).
        target: (B, T) target token ids, padding where there is no target.
        pad: the padding index.
        starts: (num_blocks,) from :func:`block_starts`.

    Returns:
        (mask, rows): (B, T) bool non-padding mask and (n,) int64 rows of
        the masked targets in row-major order.
    """
    mask = target.ne(pad)
    offsets = mask.long().cumsum(dim=1) - 1  # (B, T) j-th target of its sample
    first = torch.as_tensor(starts, device=target.device)[sample_ids.long()]  # (B,)
    rows = (first.unsqueeze(1) + offsets)[mask]
    return mask, rows.cpu().numpy()
