"""Reliability, class 3 (issue 18): a clear error for every bad input, never a traceback.
Commands run as real processes; each message must name the value or file and what to do."""

import errno
import subprocess
import sys

import pytest
import torch

from saelib import cli


def saelib(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "saelib", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def one_line_error(run, *fragments):
    assert run.returncode == 2, (run.returncode, run.stderr[-800:])
    assert "Traceback" not in run.stderr
    for fragment in fragments:
        assert fragment in run.stderr, (fragment, run.stderr[-800:])


@pytest.mark.parametrize("flags, fragment", [
    (["harvest", "--hooks", "blocks.0.hook_resid_post", "--tokens", "0"], "--tokens: must be a positive integer, got 0"),
    (["harvest", "--hooks", "blocks.0.hook_resid_post", "--context-len", "-5"], "--context-len: must be a positive integer"),
    (["harvest", "--hooks", "blocks.0.hook_resid_post", "--threads", "0"], "--threads: must be a positive integer"),
    (["harvest", "--hooks", "blocks.0.hook_resid_post", "--batch-size", "0"], "--batch-size: must be a positive integer"),
    (["harvest", "--hooks", "blocks.0.hook_resid_post", "--shard-mb", "nan"], "--shard-mb: must be a positive number"),
    (["train", "s", "o", "--lr", "-1"], "--lr: must be a positive number, got -1"),
    (["train", "s", "o", "--d-sae", "ten"], "--d-sae: 'ten' is not an integer"),
    (["autointerp", "s", "o.csv", "--tokens", "0"], "--tokens: must be a positive integer"),
    (["autointerp", "s", "o.csv", "--features", "abc"], "--features: use 'all' or a positive number"),
    (["run-notebooks", "--only", "99"], "--only 99 matches no notebook; the notebooks are 00_quickstart"),
    (["run-notebooks", "--timeout", "0"], "--timeout: must be a positive integer"),
])
def test_bad_flags_are_refused_when_parsed(flags, fragment):
    one_line_error(saelib(*flags), fragment)


def test_inputs_the_model_cannot_take(tmp_path):
    one_line_error(saelib("harvest", "--hooks", "blocks.0.hook_resid_post", "--tokens", 2000, "--context-len", 300,
                          "--out-dir", tmp_path), "context_len 300 is longer than the model's n_ctx 256")
    one_line_error(saelib("harvest", "--hooks", "blocks.0.hook_resid_post", "--tokens", 2000, "--device", "cuda",
                          "--out-dir", tmp_path), "--device cuda: this machine has no CUDA device", "--device cpu")
    assert not any(tmp_path.iterdir())  # nothing was started


def test_token_ids_from_another_tokenizer_are_refused(tiny_model, tmp_path):
    from saelib.harvest import HarvestConfig, harvest

    tokens = torch.full((2, 8), tiny_model.cfg.d_vocab + 5)
    with pytest.raises(ValueError, match=rf"outside the model's vocabulary 0..{tiny_model.cfg.d_vocab - 1}"):
        harvest(tiny_model, tokens, HarvestConfig(hooks=["blocks.0.hook_resid_post"], out_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="longer than the model's n_ctx"):
        harvest(tiny_model, torch.zeros(2, tiny_model.cfg.n_ctx + 1, dtype=torch.long),
                HarvestConfig(hooks=["blocks.0.hook_resid_post"], out_dir=str(tmp_path)))


def test_empty_and_truncated_files_are_named(tmp_path):
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "manifest.json").write_text("")
    one_line_error(saelib("train", tmp_path / "store", tmp_path / "out", "--d-sae", 32), "manifest.json is damaged or truncated",
                   "harvest this store again")
    sae = tmp_path / "sae"
    sae.mkdir()
    (sae / "cfg.json").write_text("{\"d_in\": 16, ")
    (sae / "sae_weights.safetensors").write_bytes(b"")
    one_line_error(saelib("autointerp", sae, tmp_path / "o.csv"), "cfg.json is not valid JSON", "save the SAE again")


def test_a_full_disk_names_the_shard_and_the_rerun_resumes(tiny_model, tmp_path, monkeypatch):
    # A simulated ENOSPC on the third shard (a tmpfs needs privileges this suite may not have).
    from saelib import store_writer
    from saelib.files import DiskFullError
    from saelib.harvest import HarvestConfig, harvest

    tokens = torch.randint(0, tiny_model.cfg.d_vocab, (64, 9), generator=torch.Generator().manual_seed(0))
    cfg = HarvestConfig(hooks=["blocks.0.hook_resid_post"], out_dir=str(tmp_path / "full"), dtype="float32",
                        shard_mb=64 * tiny_model.cfg.d_model * 4 / 2**20, batch_size=8)
    real_write, calls = store_writer.write_unbuffered, []

    def failing_write(path, memory, size):
        calls.append(path)
        if len(calls) == 3:  # shards 0 and 1 land; shard 2 hits the full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, memory, size)

    monkeypatch.setattr(store_writer, "write_unbuffered", failing_write)
    with pytest.raises(DiskFullError, match=r"disk full while writing .*shard_00002.npy: free space and rerun the same command"):
        harvest(tiny_model, tokens, cfg)
    monkeypatch.setattr(store_writer, "write_unbuffered", real_write)
    resumed = harvest(tiny_model, tokens, cfg)["blocks.0.hook_resid_post"]
    clean = harvest(tiny_model, tokens, HarvestConfig(**{**cfg.__dict__, "out_dir": str(tmp_path / "clean")}))[
        "blocks.0.hook_resid_post"]
    assert resumed.manifest.complete and torch.equal(resumed.rows(0, len(clean)), clean.rows(0, len(clean)))
    assert not list((tmp_path / "full").rglob("*.tmp"))


def test_an_unexpected_failure_is_one_line_unless_debugging(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("something nobody foresaw\nsecond line")

    parser = cli.build_parser()
    real_parse = parser.parse_args

    def parse(argv):
        args = real_parse(argv)
        args.func = broken
        return args

    monkeypatch.setattr(parser, "parse_args", parse)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    assert cli.main(["harvest", "--hooks", "blocks.0.hook_resid_post"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RuntimeError: something nobody foresaw" in err and "--debug" in err
    with pytest.raises(RuntimeError, match="nobody foresaw"):
        cli.main(["harvest", "--hooks", "blocks.0.hook_resid_post", "--debug"])


def test_a_real_full_disk_stops_the_harvest_with_one_line_and_the_rerun_finishes(tmp_path):
    # A 256 KiB tmpfs where this process may mount one (root on Linux); elsewhere the simulated
    # ENOSPC test above stands in.
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()[:80]})")
    try:
        command = ["harvest", "--hooks", "blocks.0.hook_resid_post", "--tokens", 6000, "--dtype", "float32",
                   "--shard-mb", 0.05, "--out-dir", disk]
        run = saelib(*command)
        one_line_error(run, "disk full while writing", "shard_", "free space and rerun the same command")
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        assert saelib(*command).returncode == 0
        from saelib.store import ActivationStore

        store = ActivationStore(disk / "blocks.0.hook_resid_post", verify="full")
        assert store.manifest.complete and not list(disk.rglob("*.tmp"))
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
