"""Exit status and message of ``python -m ppkd_fairseq.cli.train`` when fairseq-train fails."""

import subprocess
import sys

import yaml

from conftest import REPO
from ppkd_fairseq.cli import train

TINY_CONFIG = {
    "task": "language_modeling",
    "arch": "transformer_lm",
    "args": {"decoder-layers": 1, "decoder-embed-dim": 16, "decoder-ffn-embed-dim": 32,
             "decoder-attention-heads": 2, "tokens-per-sample": 32, "max-tokens": 128, "optimizer": "adam",
             "lr": 0.001, "max-update": 1},
}


def test_failed_train_exits_with_child_status(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(TINY_CONFIG))
    missing_data = tmp_path / "no-data-bin"

    result = subprocess.run(
        [sys.executable, "-m", "ppkd_fairseq.cli.train", str(config), str(missing_data),
         "--save-dir", str(tmp_path / "checkpoints"), "--cpu"],
        capture_output=True, text=True, cwd=REPO,
    )

    # fairseq-train's own error (no dict.txt in the data folder) ends with exit status 1.
    assert result.returncode == 1
    assert "dict.txt" in result.stderr
    assert result.stderr.count("Traceback") == 1
    assert "CalledProcessError" not in result.stderr
    assert result.stderr.rstrip().splitlines()[-1] == (
        "error: fairseq-train exited with status 1; see the messages above"
    )


def test_killed_train_exits_128_plus_signal(tmp_path, monkeypatch, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(TINY_CONFIG))
    # subprocess reports a child killed by SIGKILL (9) as return code -9.
    monkeypatch.setattr(train.subprocess, "run", lambda cmd: subprocess.CompletedProcess(cmd, -9))

    try:
        train.main([str(config), str(tmp_path / "data"), "--save-dir", str(tmp_path / "checkpoints"), "--cpu"])
    except SystemExit as exit:
        status = exit.code
    else:
        status = None

    assert status == 137
    assert capsys.readouterr().err == "error: fairseq-train was killed by signal 9; see the messages above\n"
