"""Files of a sweep: grid.csv, best.json, heatmaps and test-split commands.

Every file is written under a temporary name and renamed into place.
"""

import csv
import logging
import os
import shlex
import tempfile

from . import manifest as mf

logger = logging.getLogger(__name__)

GRID_COLUMNS = ["model", "teachers", "temperature", "mu", "lambda", "perplexity"]


def _temporary_path(path):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    return tmp


def _replace(tmp, path):
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600 files
    os.replace(tmp, path)


def write_grid_csv(path, result):
    """Write one row per grid point of a :class:`~ppkd_fairseq.sweep.SweepResult`."""
    tmp = _temporary_path(path)
    try:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=GRID_COLUMNS)
            writer.writeheader()
            for row in result.rows():
                writer.writerow({**row, "perplexity": repr(row["perplexity"])})
        _replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_best_json(path, best):
    mf.write_json_atomic(path, best)


def plot_heatmap(path, result, teacher_set, temperature, split="valid"):
    """Draw the perplexity on ``split`` over mu x lambda at one T as a PNG.

    Grid points with an infinite perplexity are left blank. Returns ``path``,
    or None without writing when every point is infinite.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.colors
    import matplotlib.pyplot as plt
    import numpy as np

    i = result.grid.temperatures.index(temperature)
    table = result.perplexity[teacher_set.label][i].numpy()  # (M, L)
    mus, lambdas = result.mus(teacher_set.label), result.grid.lambdas
    finite = table[np.isfinite(table)]
    if finite.size == 0:
        logger.warning("no heatmap for %s: every point at T = %g has an infinite perplexity",
                       teacher_set.label, temperature)
        return None
    with_nan = np.where(np.isinf(table), np.nan, table)
    best_j, best_l = np.unravel_index(np.nanargmin(with_nan), table.shape)

    # The colour scale ends at the 90th percentile, so that a few very bad
    # points (lambda near 1) do not flatten the region around the best one.
    top = float(np.percentile(finite, 90))
    norm = matplotlib.colors.Normalize(vmin=float(finite.min()), vmax=max(top, float(finite.min()) + 1e-9))

    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * len(lambdas), 1.5 + 0.4 * len(mus)))
    image = ax.imshow(np.ma.masked_invalid(with_nan), origin="lower", aspect="auto", cmap="viridis_r", norm=norm)
    ax.set_xticks(range(len(lambdas)))
    ax.set_xticklabels([f"{x:g}" for x in lambdas], rotation=90)
    ax.set_yticks(range(len(mus)))
    ax.set_yticklabels([f"{m:g}" for m in mus])
    ax.set_xlabel("lambda (weight of P_kNN)")
    ax.set_ylabel("mu (weight of P_hard)")
    ax.plot(best_l, best_j, marker="*", color="red", markersize=14)
    ax.set_title(
        f"{teacher_set.label}: {split} perplexity at T = {temperature:g}\n"
        f"best {table[best_j, best_l]:.3f} at mu = {mus[best_j]:g}, lambda = {lambdas[best_l]:g}"
    )
    fig.colorbar(image, ax=ax, label="perplexity", extend="max")
    fig.tight_layout()
    tmp = _temporary_path(path)
    try:
        fig.savefig(tmp, format="png", dpi=100)
        _replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        plt.close(fig)
    return path


def format_command(argv):
    """Return ``argv`` as a shell command with one option and its value per line."""
    lines = [shlex.join(argv[:2])] if len(argv) >= 2 else [shlex.join(argv)]
    rest = argv[2:]
    i = 0
    while i < len(rest):
        if rest[i].startswith("--") and i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            lines.append(shlex.join(rest[i:i + 2]))
            i += 2
        else:
            lines.append(shlex.quote(rest[i]))
            i += 1
    return " \\\n  ".join(lines)


def write_commands(path, commands, header):
    """Write a bash script that runs ``commands`` (lists of arguments) in order."""
    text = ["#!/usr/bin/env bash", *[f"# {line}" for line in header], "set -euo pipefail", ""]
    summaries = []
    for label, argv in commands:
        text += [f"# {label}", f"echo {shlex.quote('== ' + label)}", format_command(argv), ""]
        if "--ppkd-summary-out" in argv:
            summaries.append((label.split(":")[0], argv[argv.index("--ppkd-summary-out") + 1]))
    if summaries:
        # One line per command at the end, since fairseq-eval-lm's own logs are long.
        text.append('echo "== perplexities"')
        for name, summary in summaries:
            text.append(f"python -c 'import json, sys; print(sys.argv[1], json.load(open(sys.argv[2]))[\"perplexity\"])' "
                        f"{shlex.quote(name)} {shlex.quote(summary)}")
        text.append("")
    tmp = _temporary_path(path)
    try:
        with open(tmp, "w") as f:
            f.write("\n".join(text))
        _replace(tmp, path)
        os.chmod(path, os.stat(path).st_mode | 0o111)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
