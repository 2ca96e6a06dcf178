"""Text beyond the shipped sample: a Hugging Face text dataset (local files here; the hub
when online), tokenised for the model, with a held-out split and clear errors."""

import json
import subprocess
import sys

import pytest

from saelib import data

STORIES = [f"Story {i}. " + " ".join(f"The sailor number {i} saw whale {j} near the ship." for j in range(12))
           for i in range(60)]


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text")
    for part in range(2):  # two files, as datasets often ship
        lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(STORIES) if i % 2 == part]
        (folder / f"part{part}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_local_dataset_rows_come_from_single_documents(embedded, text_folder):
    windows = data.token_windows(embedded, n_tokens=40 * 16, context_len=16, text=str(text_folder), seed=0)
    assert windows.shape == (40, 16) and (windows[:, 0] == embedded.tokenizer.bos_token_id).all()
    for row in windows[:, 1:].tolist():
        piece = embedded.tokenizer.decode(row)
        assert any(piece in story for story in STORIES), piece  # never spans two documents
    again = data.token_windows(embedded, n_tokens=40 * 16, context_len=16, text=str(text_folder), seed=0)
    assert (again == windows).all()
    other = data.token_windows(embedded, n_tokens=40 * 16, context_len=16, text=str(text_folder), seed=1)
    assert not (other == windows).all()


def test_heldout_documents_are_never_trained_on(embedded, text_folder):
    def documents(split, seed):
        rows = data.dataset_rows(embedded, str(text_folder), n_rows=5, body_len=15, split=split, seed=seed)
        return {next(i for i, s in enumerate(STORIES) if embedded.tokenizer.decode(r) in s) for r in rows.tolist()}

    heldout = documents("heldout", seed=None)
    assert heldout and all(data.zlib.crc32(STORIES[i].encode()) % data.HELDOUT_SHARE == 0 for i in heldout)
    for seed in (None, 0, 1):  # whatever the order, the split is the same
        assert not documents("train", seed) & heldout


def test_environment_switch_and_errors(embedded, text_folder, monkeypatch):
    monkeypatch.setenv(data.TEXT_ENV, str(text_folder))
    windows = data.token_windows(embedded, n_tokens=10 * 16, context_len=16)
    assert any(embedded.tokenizer.decode(windows[0, 1:].tolist()) in s for s in STORIES)
    with pytest.raises(ValueError, match="holds only .* rows .* ask for fewer"):
        data.token_windows(embedded, n_tokens=10**6, context_len=16)
    monkeypatch.delenv(data.TEXT_ENV)
    with pytest.raises(ValueError, match="SAELIB_TEXT"):  # the shipped text points to the switch
        data.token_windows(embedded, n_tokens=10**9, context_len=16)
    with pytest.raises(FileNotFoundError, match="no .jsonl"):
        data.token_windows(embedded, n_tokens=100, text=str(text_folder / "missing"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(data.TextNeedsNetworkError, match="hub cannot be reached.*SAELIB_TEXT"):
        data.token_windows(embedded, n_tokens=100, text="NeelNanda/pile-10k")


def test_harvest_command_reads_a_named_text(text_folder, tmp_path):
    run = subprocess.run([sys.executable, "-m", "saelib", "harvest", "--hooks", "blocks.0.hook_resid_post",
                          "--tokens", "320", "--context-len", "16", "--text", str(text_folder), "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    manifest = json.loads(next(tmp_path.rglob("manifest.json")).read_text())
    assert manifest["n_contexts"] == 20 and manifest["complete"]
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-m", "saelib", "harvest", "--hooks", "blocks.0.hook_resid_post",
                          "--tokens", "320", "--text", "NeelNanda/pile-10k", "--out-dir", str(tmp_path / "b")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 2 and "hub cannot be reached" in run.stderr and "Traceback" not in run.stderr
