"""Reliability, class 1 (issue 18): everything a reader trusts is verified. Token windows,
manifest statistics, trainer checkpoints and SAE folders are refused, with the file and
the remedy named, when their bytes were altered; killed writers' temporary files and
metric rows do not pile up."""

import json
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from saelib.files import remove_orphan_tmp
from saelib.sae import SAEConfig, make_sae
from saelib.sae_io import SAEFormatError, load_sae, save_sae
from saelib.store import ActivationStore, CorruptShardError, StoreError, StoreManifest
from saelib.store_writer import StoreWriter
from saelib.train import METRICS_FILE, STATE_FILE, CorruptCheckpointError, TrainConfig, train_sae

D_IN, CONTEXT_LEN = 16, 9


def write_store(folder, n_contexts=64) -> ActivationStore:
    manifest = StoreManifest(model="toy", model_fingerprint="f" * 16, hook="blocks.0.hook_resid_post", d_in=D_IN,
                             dtype="float32", shard_rows=64, context_len=CONTEXT_LEN, n_contexts=n_contexts,
                             first_position=1, contexts_sha256="")
    contexts = np.arange(n_contexts * CONTEXT_LEN, dtype=np.int32).reshape(n_contexts, CONTEXT_LEN) % 97
    writer = StoreWriter(folder, manifest, contexts)
    writer.append(torch.randn(n_contexts * (CONTEXT_LEN - 1), D_IN, generator=torch.Generator().manual_seed(0)))
    return writer.close()


def flip_byte(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_altered_token_windows_are_refused(tmp_path):
    store = write_store(tmp_path / "s")
    assert store.tokens_of(np.arange(4)).tolist() == [1, 2, 3, 4]
    path = store.folder / "contexts.npy"
    flip_byte(path, path.stat().st_size - 7)  # a token id, not the header
    reopened = ActivationStore(store.folder)
    with pytest.raises(CorruptShardError, match=r"contexts.npy fails its sha256 check.*--overwrite"):
        reopened.tokens_of(np.arange(4))


def test_damaged_manifest_statistics_and_json_are_refused(tmp_path):
    store = write_store(tmp_path / "s")
    manifest_path = store.folder / "manifest.json"
    good = manifest_path.read_text()
    for field, value in [("mean_sq_norm", float("nan")), ("mean_norm", float("inf")), ("mean_sq_norm", 1e-3)]:
        values = json.loads(good)
        values[field] = value
        manifest_path.write_text(json.dumps(values))
        with pytest.raises(StoreError, match=r"manifest.json holds damaged statistics.*harvest this store again"):
            ActivationStore(store.folder)
    values = json.loads(good)
    values["mean"][3] = float("nan")
    manifest_path.write_text(json.dumps(values))
    with pytest.raises(StoreError, match="mean holds NaN"):
        ActivationStore(store.folder)
    manifest_path.write_text(good[: len(good) // 2])
    with pytest.raises(StoreError, match=r"manifest.json is damaged or truncated.*harvest this store again"):
        ActivationStore(store.folder)
    contexts = np.arange(64 * CONTEXT_LEN, dtype=np.int32).reshape(64, CONTEXT_LEN) % 97
    with pytest.raises(StoreError, match=r"manifest.json is damaged or truncated.*--overwrite"):
        StoreWriter(store.folder, StoreManifest.from_json(good), contexts)


def trained_run(store, out_dir, steps=6):
    cfg = TrainConfig(total_tokens=64 * 12, batch_size=64, out_dir=str(out_dir), progress=False)
    sae_cfg = SAEConfig(d_in=D_IN, d_sae=32, architecture="topk", k=4, hook_name=store.hook)
    return sae_cfg, cfg, train_sae(sae_cfg, store, cfg, max_steps=steps)


def test_a_checkpoint_with_altered_weights_is_not_resumed(tmp_path):
    store = write_store(tmp_path / "s")
    sae_cfg, cfg, _ = trained_run(store, tmp_path / "run")
    path = tmp_path / "run" / STATE_FILE
    state = torch.load(path, weights_only=True)
    data = path.read_bytes()
    W_enc_bytes = state["sae"]["W_enc"].contiguous().numpy().tobytes()
    offset = data.index(W_enc_bytes[:64])  # the tensor's bytes inside the zip
    flip_byte(path, offset + 32)
    with pytest.raises(CorruptCheckpointError, match=r"trainer_state.pt fails its checksum.*move it away"):
        train_sae(sae_cfg, store, cfg)
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match=r"trainer_state.pt cannot be read.*move it away"):
        train_sae(sae_cfg, store, cfg)
    path.write_bytes(data)
    assert train_sae(sae_cfg, store, cfg).step == 12  # the intact checkpoint resumes to the end


def test_sae_folders_are_verified(tmp_path):
    sae = make_sae(SAEConfig(d_in=D_IN, d_sae=32, architecture="topk", k=4))
    with torch.no_grad():
        sae.W_enc.normal_()
    folder = save_sae(sae, tmp_path / "sae")
    weights = folder / "sae_weights.safetensors"
    assert torch.equal(load_sae(folder).W_enc, sae.W_enc)
    data = weights.read_bytes()
    offset = data.index(sae.W_enc.detach().numpy().tobytes()[:64])
    flip_byte(weights, offset + 8)
    with pytest.raises(SAEFormatError, match="sae_weights.safetensors fails its checksum"):
        load_sae(folder)
    weights.write_bytes(data[:100])
    with pytest.raises(SAEFormatError, match="sae_weights.safetensors cannot be read.*truncated"):
        load_sae(folder)
    from safetensors.torch import save_file  # a folder written by another tool: no checksum, NaN inside

    tensors = {k: v.detach().contiguous().clone() for k, v in sae.weights_to_save().items()}
    tensors["W_dec"][0, 0] = float("nan")
    save_file(tensors, str(weights))
    with pytest.raises(SAEFormatError, match="W_dec hold NaN or inf.*retrain"):
        load_sae(folder)
    with torch.no_grad():
        sae.W_dec[1, 1] = float("inf")
    with pytest.raises(SAEFormatError, match="not saving .*W_dec hold NaN or inf"):
        save_sae(sae, tmp_path / "other")
    assert not (tmp_path / "other" / "sae_weights.safetensors").exists()


def test_killed_writers_leave_no_tmp_files_and_no_duplicate_rows(tmp_path):
    store = write_store(tmp_path / "s")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        orphan = store.folder / f"shard_00007.npy.{dead.pid}.tmp"
        in_progress = store.folder / f"shard_00008.npy.{alive.pid}.tmp"
        orphan.write_bytes(b"x" * 1000)
        in_progress.write_bytes(b"x" * 1000)
        contexts = np.arange(64 * CONTEXT_LEN, dtype=np.int32).reshape(64, CONTEXT_LEN) % 97
        StoreWriter(store.folder, StoreManifest.from_json((store.folder / "manifest.json").read_text()), contexts).close()
        assert not orphan.exists() and in_progress.exists()  # a live writer's file is left alone
    finally:
        alive.kill()
        alive.wait()
    assert remove_orphan_tmp(store.folder) == [in_progress]
    # a training run killed before its first checkpoint left metric rows and no state
    run = tmp_path / "run"
    run.mkdir()
    (run / METRICS_FILE).write_text("".join(json.dumps({"step": s, "fvu": 1.0}) + "\n" for s in (10, 20)))
    (run / f"{STATE_FILE}.{dead.pid}.tmp").write_bytes(b"partial")
    cfg = TrainConfig(total_tokens=64 * 20, batch_size=64, out_dir=str(run), progress=False, log_every=10)
    train_sae(SAEConfig(d_in=D_IN, d_sae=32, architecture="topk", k=4, hook_name=store.hook), store, cfg)
    steps = [json.loads(r)["step"] for r in (run / METRICS_FILE).read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 20
    assert not list(run.glob("*.tmp"))


def test_one_writer_per_store_and_stale_locks_are_recovered(tmp_path):
    import socket

    from saelib.files import LOCK_FILE, FolderLockedError

    store = write_store(tmp_path / "s")
    assert not (store.folder / LOCK_FILE).exists()  # released on close
    contexts = np.arange(64 * CONTEXT_LEN, dtype=np.int32).reshape(64, CONTEXT_LEN) % 97
    manifest = StoreManifest.from_json((store.folder / "manifest.json").read_text())
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (store.folder / LOCK_FILE).write_text(json.dumps({"pid": alive.pid, "host": socket.gethostname(), "since": "now"}))
        with pytest.raises(FolderLockedError, match=rf"store .* is being written by process {alive.pid} on .*delete .*{LOCK_FILE}"):
            StoreWriter(store.folder, manifest, contexts)
    finally:
        alive.kill()
        alive.wait()
    StoreWriter(store.folder, manifest, contexts).close()  # its owner is gone: the lock is stale
    assert not (store.folder / LOCK_FILE).exists()


LOCK_POLLER = """
import sys, time
path, empty, full = sys.argv[1], 0, 0
end = time.time() + float(sys.argv[2])
while time.time() < end:
    try:
        with open(path) as handle:
            text = handle.read()
    except FileNotFoundError:
        continue
    empty, full = (empty, full + 1) if text else (empty + 1, full)
print(empty, full)
"""


def test_a_lock_file_is_never_seen_without_its_owner(tmp_path):
    # Another process reads the lock as fast as it can while this one takes and releases it
    # thousands of times. Created empty and then written, the lock was read empty 58,587
    # times in 2.5 s (against 122,679 reads with content): a refused writer could not say
    # whose the folder was. Linked in whole, never.
    from saelib.files import LOCK_FILE, acquire_lock, release_lock

    poller = subprocess.Popen([sys.executable, "-c", LOCK_POLLER, str(tmp_path / LOCK_FILE), "2"],
                              stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)  # the poller is reading
    started = time.time()
    while time.time() - started < 1.2:
        release_lock(acquire_lock(tmp_path))
    empty, full = map(int, poller.communicate(timeout=60)[0].split())
    assert full > 100  # it did see the lock, often
    assert empty == 0
    assert not list(tmp_path.iterdir())  # nothing left: no lock, no temporary file


def test_two_harvests_into_one_folder_at_once_never_mix(tmp_path):
    # Real processes, started together, different text (seeds) into the same folder: one
    # writes the store, the other is refused with a clear message; the store is whole.
    def start(seed):
        return subprocess.Popen([sys.executable, "-m", "saelib", "harvest", "--hooks", "blocks.0.hook_resid_post",
                                 "--tokens", "40000", "--seed", str(seed), "--out-dir", str(tmp_path)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    runs = [start(0), start(1)]
    results = [(run.wait(timeout=600), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    # the lock names its owner from the instant it exists; a run that starts after the other
    # finished finds a store of other text instead
    assert (re.search(r"is being written by process \d+ on ", refused) or "contexts_sha256" in refused), refused
    assert "Traceback" not in refused
    store = ActivationStore(next(tmp_path.rglob("manifest.json")).parent, verify="full")
    assert store.manifest.complete and len(store.contexts()) == store.manifest.n_contexts  # contexts verified too


STALE_LOCK_TAKER = """
import sys, time
from pathlib import Path
import saelib.files as files
folder, delay = Path(sys.argv[1]), float(sys.argv[2])
judge = files._pid_alive
def slow_judge(pid):  # this process is descheduled while it judges the stale lock
    alive = judge(pid)
    time.sleep(delay)
    return alive
files._pid_alive = slow_judge
try:
    lock = files.acquire_lock(folder)
except files.FolderLockedError:
    print("refused")
    sys.exit(0)
held_from = time.time()
time.sleep(2.5)
print("held", held_from, time.time())
files.release_lock(lock)
"""


def test_two_processes_taking_over_one_stale_lock_never_both_hold_it(tmp_path):
    # Both find the lock of a killed writer. The slower one judged it stale before the faster
    # took it over; it must not then delete the faster one's fresh lock and take it as well.
    import socket

    from saelib.files import LOCK_FILE

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "then"}))
    # The slow one starts first and spends 1 s judging the lock it read; the fast one, started
    # 0.3 s later, judges at once, so it takes the lock over while the slow one still judges
    # (before the fix the slow one then deleted the fresh lock: both held the folder, 3 of 3 runs).
    slow = subprocess.Popen([sys.executable, "-c", STALE_LOCK_TAKER, str(tmp_path), "1.0"],
                            stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)
    fast = subprocess.Popen([sys.executable, "-c", STALE_LOCK_TAKER, str(tmp_path), "0"],
                            stdout=subprocess.PIPE, text=True)
    outcomes = [run.communicate(timeout=60)[0].split() for run in (slow, fast)]
    held = sorted((float(out[1]), float(out[2])) for out in outcomes if out[0] == "held")
    assert len(held) >= 1
    assert all(later[0] >= earlier[1] for earlier, later in zip(held, held[1:])), outcomes  # never at once
    assert not (tmp_path / LOCK_FILE).exists()
