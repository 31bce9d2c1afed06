"""Tests for ``ppkd_fairseq.cli.train``: configurations, training and resuming.

The training tests run fairseq-train on CPU for a few updates of 1-layer,
16-wide models over the ``tiny_data`` corpus of conftest.py. Each run takes
a few seconds, most of it spent importing fairseq.
"""

import glob
import os
import subprocess
import sys

import pytest
import torch
import yaml
from fairseq.data import Dictionary

from ppkd_fairseq.cli import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))

# Shared by both tiny models: 32-token blocks, 4 blocks per batch, no workers.
TINY_BATCH = {
    "tokens-per-sample": 32,
    "sample-break-mode": "none",
    "max-tokens": 128,
    "optimizer": "adam",
    "lr": 0.001,
    "max-update": 3,
    "seed": 1,
    "log-format": "simple",
    "log-interval": 1,
    "no-epoch-checkpoints": True,
    "num-workers": 0,
}

TINY_CAUSAL_LM = {
    "task": "language_modeling",
    "arch": "transformer_lm",
    "criterion": "adaptive_loss",
    "args": {
        "decoder-layers": 1,
        "decoder-embed-dim": 16,
        "decoder-ffn-embed-dim": 32,
        "decoder-attention-heads": 2,
        "adaptive-softmax-cutoff": "20",  # head of 20 words, one tail cluster
        "ddp-backend": "legacy_ddp",
        **TINY_BATCH,
    },
}

TINY_MASKED_LM = {
    "task": "masked_lm",
    "arch": "roberta",
    "criterion": "masked_lm",
    "args": {
        "encoder-layers": 1,
        "encoder-embed-dim": 16,
        "encoder-ffn-embed-dim": 32,
        "encoder-attention-heads": 2,
        "max-positions": 32,
        **TINY_BATCH,
    },
}


def write_config(tmp_path, config):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def load_checkpoint(save_dir):
    return torch.load(os.path.join(save_dir, "checkpoint_last.pt"), map_location="cpu", weights_only=False)


def model_setting(state, name):
    """Return a model option stored in a checkpoint's ``cfg``.

    Dataclass-based models (transformer_lm) store a dict there, and models
    still configured through argparse (roberta) store a Namespace.
    """
    model_cfg = state["cfg"]["model"]
    return model_cfg[name] if isinstance(model_cfg, dict) else getattr(model_cfg, name)


def test_config_to_argv():
    config = {"task": "t", "arch": "a", "criterion": "c", "args": {"lr": 1.0, "flag": True, "off": False, "none": None}}

    assert train.config_to_argv(config) == ["--task", "t", "--arch", "a", "--criterion", "c", "--lr", "1.0", "--flag"]


def test_requested_max_update():
    config = {"args": {"max-update": 3}}

    assert train.requested_max_update(config) == 3
    assert train.requested_max_update(config, ["--max-update", "5"]) == 5
    assert train.requested_max_update(config, ["--max-update=7", "--lr", "1"]) == 7
    assert train.requested_max_update({"args": {}}) is None
    assert train.requested_max_update(config, ["--max-update", "0"]) is None


def test_unknown_config_lists_available():
    with pytest.raises(SystemExit) as excinfo:
        train.load_config("no_such_config")

    assert "no_such_config" in str(excinfo.value.code)
    assert "wt2_cpu_student" in str(excinfo.value.code)


def test_extends_merges_base(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"task": "language_modeling", "arch": "transformer_lm",
                                    "criterion": "adaptive_loss",
                                    "args": {"lr": 0.1, "max-update": 5, "fp16": True}}))
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({"extends": str(base), "criterion": "ppkd_distillation",
                                     "args": {"lr": 0.2, "kd-alpha": 0.3, "fp16": None}}))

    config = train.load_config(str(child))

    assert config["task"] == "language_modeling"
    assert config["arch"] == "transformer_lm"
    assert config["criterion"] == "ppkd_distillation"
    assert config["args"] == {"lr": 0.2, "max-update": 5, "fp16": None, "kd-alpha": 0.3}
    assert "extends" not in config
    argv = train.config_to_argv(config)
    assert "--fp16" not in argv
    assert argv[argv.index("--lr") + 1] == "0.2"


def test_extends_cycle_is_rejected(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump({"extends": str(b), "args": {}}))
    b.write_text(yaml.safe_dump({"extends": str(a), "args": {}}))

    with pytest.raises(SystemExit) as excinfo:
        train.load_config(str(a))

    assert "cycle" in str(excinfo.value.code)


KD_CONFIGS = [p for p in CONFIGS if "_student" in os.path.basename(p) and p.endswith("_kd.yaml")]


def test_every_student_has_a_kd_twin():
    students = {os.path.basename(p)[:-5] for p in CONFIGS
                if "_student" in os.path.basename(p) and not p.endswith("_kd.yaml")}

    assert {os.path.basename(p)[:-8] for p in KD_CONFIGS} == students


@pytest.mark.parametrize("path", KD_CONFIGS, ids=[os.path.basename(p)[:-5] for p in KD_CONFIGS])
def test_kd_config_extends_student(path):
    kd = train.load_config(path)
    student = train.load_config(os.path.basename(path)[: -len("_kd.yaml")])

    assert kd["criterion"] == "ppkd_distillation"
    assert (kd["task"], kd["arch"]) == (student["task"], student["arch"])
    kd_args = {k: v for k, v in kd["args"].items() if not k.startswith("kd-")}
    assert kd_args == student["args"]
    assert (kd["args"]["kd-alpha"], kd["args"]["kd-temperature"], kd["args"]["kd-teacher"]) == (0.5, 2.0, "causal")


def test_dry_run_prints_command(tmp_path, capsys):
    config = write_config(tmp_path, TINY_CAUSAL_LM)
    save_dir = tmp_path / "checkpoints"

    train.main([config, "data-bin/tiny", "--save-dir", str(save_dir), "--cpu", "--dry-run", "--", "--max-update", "7"])

    printed = capsys.readouterr().out.strip()
    assert "-m fairseq_cli.train data-bin/tiny --task language_modeling --arch transformer_lm" in printed
    assert f"--save-dir {save_dir}" in printed
    assert "--user-dir" in printed
    assert "--cpu" in printed
    # The extra flags come last, so they override the configuration's.
    assert printed.index("--max-update 3") < printed.index("--max-update 7")
    assert printed.endswith("--max-update 7")
    assert not save_dir.exists()


def test_causal_lm_trains_and_resumes(tmp_path, tiny_data, capfd):
    config = write_config(tmp_path, TINY_CAUSAL_LM)
    save_dir = str(tmp_path / "checkpoints")

    train.main([config, tiny_data, "--save-dir", save_dir, "--cpu"])

    state = load_checkpoint(save_dir)
    assert state["optimizer_history"][-1]["num_updates"] == 3
    assert state["extra_state"]["train_iterator"]["iterations_in_epoch"] == 3
    assert model_setting(state, "decoder_layers") == 1
    assert model_setting(state, "decoder_embed_dim") == 16
    capfd.readouterr()

    train.main([config, tiny_data, "--save-dir", save_dir, "--cpu", "--", "--max-update", "5"])

    log = capfd.readouterr()
    output = log.out + log.err
    assert "(epoch 1 @ 3 updates)" in output
    assert "num_updates=4," in output
    assert "num_updates=1," not in output
    state = load_checkpoint(save_dir)
    assert state["optimizer_history"][-1]["num_updates"] == 5
    assert state["extra_state"]["train_iterator"]["iterations_in_epoch"] == 5

    # A third run at the same max-update finds training finished and starts
    # nothing, so the checkpoint is not rewritten.
    before = os.stat(os.path.join(save_dir, "checkpoint_last.pt")).st_mtime_ns
    train.main([config, tiny_data, "--save-dir", save_dir, "--cpu", "--", "--max-update", "5"])
    assert os.stat(os.path.join(save_dir, "checkpoint_last.pt")).st_mtime_ns == before
    assert train.finished_updates(save_dir) == 5
    with open(os.path.join(save_dir, "train.log")) as f:
        assert len([line for line in f if line.startswith("# ")]) == 2


def test_masked_lm_trains(tmp_path, tiny_data):
    config = write_config(tmp_path, TINY_MASKED_LM)
    save_dir = str(tmp_path / "checkpoints")

    train.main([config, tiny_data, "--save-dir", save_dir, "--cpu"])

    state = load_checkpoint(save_dir)
    assert state["optimizer_history"][-1]["num_updates"] == 3
    assert state["cfg"]["task"]["_name"] == "masked_lm"
    assert model_setting(state, "encoder_layers") == 1
    embed = state["model"]["encoder.sentence_encoder.embed_tokens.weight"]
    dictionary = Dictionary.load(os.path.join(tiny_data, "dict.txt"))
    # The task appends <mask> to the data-bin's dictionary.
    assert tuple(embed.shape) == (len(dictionary) + 1, 16)


def run_script(name, *args, dry_run=True):
    env = dict(os.environ)
    # The scripts call "python"; put this interpreter's folder first on PATH.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    if dry_run:
        env["DRY_RUN"] = "1"
    return subprocess.run(
        ["bash", os.path.join(REPO, "scripts", name), *args], env=env, capture_output=True, text=True
    )


@pytest.mark.parametrize(
    "script,config", [("train_lm.sh", "wt103_teacher"), ("train_mlm.sh", "wt103_mlm_teacher")]
)
def test_script_dry_run(tmp_path, script, config):
    save_dir = tmp_path / "checkpoints"

    result = run_script(script, config, "data-bin/wt103", str(save_dir), "--update-freq", "24")

    assert result.returncode == 0, result.stderr
    printed = result.stdout.strip()
    assert f"data-bin/wt103 --task {train.load_config(config)['task']}" in printed
    assert f"--save-dir {save_dir}" in printed
    assert printed.index("--update-freq 3") < printed.index("--update-freq 24")
    assert printed.endswith("--update-freq 24")
    assert not save_dir.exists()


def test_script_rejects_other_task(tmp_path):
    result = run_script("train_lm.sh", "wt103_mlm_teacher", "data-bin/wt103", str(tmp_path / "ck"))

    assert result.returncode == 2
    assert "has task masked_lm" in result.stderr
    assert "scripts/train_mlm.sh" in result.stderr


def test_script_needs_three_arguments():
    result = run_script("train_mlm.sh", "wt103_mlm_teacher", "data-bin/wt103")

    assert result.returncode == 2
    assert "usage:" in result.stderr


@pytest.fixture(scope="module")
def fairseq_parse():
    """Return a function that parses fairseq-train flags as fairseq-train does."""
    from fairseq import options

    def parse(argv):
        parser = options.get_training_parser()
        return options.parse_args_and_arch(parser, input_args=argv)

    return parse


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p)[:-5] for p in CONFIGS])
def test_shipped_config_parses(path, fairseq_parse):
    config = train.load_config(path)
    cmd = train.build_command(config, "data-bin/x", "checkpoints/x", cpu=True, user_dir=None)

    args = fairseq_parse(cmd[3:])

    assert args.task == config["task"]
    assert args.arch == config["arch"]
    assert args.max_update == config["args"]["max-update"]


WT103_CONFIGS = [p for p in CONFIGS if os.path.basename(p).startswith("wt103_")]

# Size of each WikiText-103 configuration: (layers, d, FFN width, heads).
WT103_SIZES = {
    "wt103_student_small": (4, 384, 1024, 6),
    "wt103_student_mid": (6, 768, 1536, 8),
    "wt103_student_large": (12, 768, 3072, 12),
    "wt103_student_distilgpt2": (6, 768, 3072, 12),
    "wt103_student_gpt2small": (12, 768, 3072, 12),
    "wt103_teacher": (16, 1024, 4096, 16),
    "wt103_mlm_teacher": (16, 1024, 4096, 16),
}


def test_wt103_configs_present():
    names = {os.path.basename(p)[:-5] for p in WT103_CONFIGS}

    assert set(WT103_SIZES) <= names


@pytest.mark.parametrize("path", WT103_CONFIGS, ids=[os.path.basename(p)[:-5] for p in WT103_CONFIGS])
def test_wt103_config_training_settings(path, fairseq_parse):
    name = os.path.basename(path)[:-5]
    config = train.load_config(path)
    args = fairseq_parse(train.build_command(config, "data-bin/x", "checkpoints/x", cpu=True)[3:])

    assert args.optimizer == "nag"
    assert args.momentum == 0.99
    assert args.lr_scheduler == "cosine"
    assert args.warmup_updates == 16000
    assert args.max_tokens == 3072
    assert args.tokens_per_sample == 3072
    if name in WT103_SIZES:
        prefix = "encoder" if config["task"] == "masked_lm" else "decoder"
        size = (
            getattr(args, f"{prefix}_layers"),
            getattr(args, f"{prefix}_embed_dim"),
            getattr(args, f"{prefix}_ffn_embed_dim"),
            getattr(args, f"{prefix}_attention_heads"),
        )
        assert size == WT103_SIZES[name]
    if config["task"] == "language_modeling":
        tied = (args.adaptive_input and args.tie_adaptive_weights) or args.share_decoder_input_output_embed
        assert tied, f"{name}: input and output embeddings are not shared"
        # fairseq's dataclass defaults these to 512 whatever the width is.
        assert args.decoder_input_dim == args.decoder_embed_dim
        assert args.decoder_output_dim == args.decoder_embed_dim
    else:
        assert not args.untie_weights_roberta
        assert args.max_positions >= args.tokens_per_sample
