"""Train a model with ``fairseq-train`` from a configuration in ``configs/``.

Usage::

    python -m ppkd_fairseq.cli.train wt2_cpu_student data-bin/wikitext-2 \\
        --save-dir checkpoints/wt2_cpu_student [-- extra fairseq-train flags]

A configuration is a YAML file with ``task``, ``arch``, ``criterion`` and
``args`` (fairseq-train flags without their leading dashes; ``true`` for a
switch), or with ``extends: BASE`` and only what differs from BASE. A rerun resumes from ``SAVE_DIR/checkpoint_last.pt``, which fairseq
loads by default, and returns at once when training has finished.
"""

import argparse
import logging
import os
import shlex
import subprocess
import sys

import yaml

logger = logging.getLogger("ppkd_fairseq.train")

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


def _config_path(name_or_path):
    """Return the YAML path of a configuration name (``configs/NAME.yaml``) or path."""
    path = name_or_path
    if not os.path.exists(path):
        path = os.path.join(CONFIG_DIR, name_or_path + ".yaml")
    if not os.path.exists(path):
        available = sorted(n[:-5] for n in os.listdir(CONFIG_DIR) if n.endswith(".yaml")) if os.path.isdir(CONFIG_DIR) else []
        raise SystemExit(f"configuration {name_or_path!r} not found; available: {', '.join(available)}")
    return path


def load_config(name_or_path, _seen=()):
    """Load a configuration by name (``configs/NAME.yaml``) or by path.

    A configuration with ``extends: BASE`` starts from BASE (a name or a
    path) and overrides it: its ``task``, ``arch`` and ``criterion`` replace
    BASE's where given, and its ``args`` are merged into BASE's, a ``null``
    value removing that flag.
    """
    path = _config_path(name_or_path)
    real = os.path.realpath(path)
    if real in _seen:
        chain = " -> ".join(list(_seen) + [real])
        raise SystemExit(f"{path}: 'extends' forms a cycle ({chain}); make one configuration the plain base")
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    base_name = config.pop("extends", None)
    if base_name is not None:
        base = load_config(base_name, _seen + (real,))
        args = dict(base["args"])
        args.update(config.get("args") or {})
        config = {**base, **config, "args": args}
    for field in ("task", "arch", "args"):
        if field not in config:
            raise SystemExit(f"{path}: missing field {field!r}")
    return config


def config_to_argv(config):
    """Turn a configuration into fairseq-train flags."""
    argv = ["--task", config["task"], "--arch", config["arch"]]
    if config.get("criterion"):
        argv += ["--criterion", config["criterion"]]
    for key, value in config["args"].items():
        if value is True:
            argv.append(f"--{key}")
        elif value is False or value is None:
            continue
        else:
            argv += [f"--{key}", str(value)]
    return argv


def build_command(config, data, save_dir, extra=(), cpu=None, user_dir=None):
    """Return the fairseq-train command line as a list."""
    cmd = [sys.executable, "-m", "fairseq_cli.train", data] + config_to_argv(config)
    cmd += ["--save-dir", save_dir]
    if user_dir:
        cmd += ["--user-dir", user_dir]
    if cpu is None:
        import torch

        cpu = not torch.cuda.is_available()
    if cpu:
        cmd.append("--cpu")
    return cmd + list(extra)


def requested_max_update(config, extra=()):
    """Return the ``--max-update`` that fairseq-train will use, or None when unset.

    A flag among ``extra`` overrides the configuration, as it comes later on
    the command line. fairseq treats 0 as no limit, and so does this function.
    """
    value = config["args"].get("max-update")
    for i, flag in enumerate(extra):
        if flag == "--max-update" and i + 1 < len(extra):
            value = extra[i + 1]
        elif flag.startswith("--max-update="):
            value = flag.split("=", 1)[1]
    if value is None or int(value) == 0:
        return None
    return int(value)


def finished_updates(save_dir):
    """Return the update count stored in ``SAVE_DIR/checkpoint_last.pt``, or None."""
    path = os.path.join(save_dir, "checkpoint_last.pt")
    if not os.path.exists(path):
        return None
    import torch

    # fairseq checkpoints hold argparse and OmegaConf objects, so they need
    # weights_only=False; mmap avoids reading the weights to get one integer.
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except RuntimeError:  # saved in the legacy (non-zip) format, which mmap cannot read
        state = torch.load(path, map_location="cpu", weights_only=False)
    return state["optimizer_history"][-1]["num_updates"]


def main(argv=None):
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO)
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description="Train a model from a configuration in configs/.")
    parser.add_argument("config", help="configuration name in configs/ (without .yaml) or a path")
    parser.add_argument("data", help="fairseq data-bin folder")
    parser.add_argument("--save-dir", required=True, help="checkpoint folder; a rerun resumes from it")
    parser.add_argument("--cpu", action="store_true", default=None, help="train on CPU (default: when no GPU)")
    parser.add_argument("--dry-run", action="store_true", help="print the command without running it")
    args = parser.parse_args(argv)

    config = load_config(args.config)
    user_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = build_command(config, args.data, args.save_dir, extra, cpu=args.cpu, user_dir=user_dir)
    if args.dry_run:
        print(shlex.join(cmd))
        return
    # fairseq-train resumed at its max-update still runs one more update and
    # rewrites the checkpoints, so a finished run is detected here instead.
    # NOTE: only --max-update is checked here. A run limited by --max-epoch
    # alone is handed to fairseq-train again, which loads the checkpoint first.
    max_update = requested_max_update(config, extra)
    done = finished_updates(args.save_dir)
    if max_update is not None and done is not None and done >= max_update:
        logger.info(
            "%s/checkpoint_last.pt is at update %d of max-update %d; training has finished",
            args.save_dir, done, max_update,
        )
        return
    os.makedirs(args.save_dir, exist_ok=True)
    logger.info("running %s", shlex.join(cmd))
    with open(os.path.join(args.save_dir, "train.log"), "a") as log:
        log.write("# " + shlex.join(cmd) + "\n")
    returncode = subprocess.run(cmd).returncode
    if returncode != 0:
        # fairseq-train has printed its own error and traceback already.
        if returncode < 0:
            print(f"error: fairseq-train was killed by signal {-returncode}; see the messages above",
                  file=sys.stderr)
            raise SystemExit(128 - returncode)  # the shell's status for a signal
        print(f"error: fairseq-train exited with status {returncode}; see the messages above", file=sys.stderr)
        raise SystemExit(returncode)


if __name__ == "__main__":
    main()
