"""``python -m saelib autointerp``: explains and scores a saved SAE's features into a CSV;
bad input and an unreachable LLM server end with a one-line error and exit code 2."""

import socket

import pandas as pd
import pytest
import torch

from saelib.cli import main
from saelib.sae import SAEConfig, make_sae


@pytest.fixture()
def sae_folder(tmp_path, monkeypatch, embedded):
    monkeypatch.setenv("SAELIB_ARTIFACTS", str(tmp_path / "artifacts"))
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(embedded.cfg.d_model, 32, "topk", k=4, model_name="embedded",
                             hook_name="blocks.1.hook_resid_post"))
    sae.save(tmp_path / "sae")
    return tmp_path / "sae"


def test_autointerp_command_writes_one_row_per_feature(sae_folder, tmp_path, capsys):
    out = tmp_path / "scores.csv"
    assert main(["autointerp", str(sae_folder), str(out), "--tokens", "8192", "--features", "5"]) == 0
    scores = pd.read_csv(out, keep_default_na=False)
    assert len(scores) == 5 and scores.explanation.str.startswith("fires on").all()
    assert (scores.failure == "").all() and scores.correlation.astype(float).between(-1, 1).all()
    assert "correlation" in capsys.readouterr().out


def test_autointerp_command_refuses_bad_input_with_one_line(sae_folder, tmp_path, capsys):
    assert main(["autointerp", str(sae_folder), str(tmp_path / "scores.txt")]) == 2
    assert "should be a .csv" in capsys.readouterr().err
    assert main(["autointerp", str(tmp_path / "missing"), str(tmp_path / "s.csv")]) == 2
    assert "missing is not an SAE folder" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["autointerp", str(sae_folder), str(tmp_path / "s.csv"), "--tokens", "8192", "--features", "2",
            "--explainer", "llm", "--llm-base-url", f"http://127.0.0.1:{port}/v1", "--llm-model", "m"]
    assert main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(f"error: no answer from http://127.0.0.1:{port}/v1")
    assert not (tmp_path / "s.csv").exists()
