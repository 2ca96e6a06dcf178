"""saelib.allocator: large freed tensors are reused, not page-faulted in afresh, in real processes."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")

# Ten forward passes of the embedded model over 32 windows of 128 tokens, after two to warm
# up; prints whether saelib set the thresholds and the minor page faults of the ten.
PROBE = """
import resource, torch, saelib, saelib.allocator
from saelib.models import load_model
torch.manual_seed(0)
model = load_model("embedded", device="cpu")
tokens = torch.randint(0, model.cfg.d_vocab, (32, 128))
with torch.inference_mode():
    for _ in range(2):
        model(tokens, stop_at_layer=3, return_type=None)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        model(tokens, stop_at_layer=3, return_type=None)
print(saelib.allocator._applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(**env_changes) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "SAELIB_MALLOC" and not k.startswith("MALLOC_")}
    env.update(env_changes)
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    applied, faults = run.stdout.split()
    return applied, int(faults)


def test_freed_tensors_are_reused_without_page_faults():
    applied, tuned = probe()  # the default
    opted_out, system = probe(SAELIB_MALLOC="system")  # glibc's own behaviour
    assert (applied, opted_out) == ("True", "False")
    # glibc's own settings give the activations freed at the heap's top back after every
    # pass (about 60k faults of 4 KiB pages each here; far fewer with transparent huge pages)
    assert system >= 10 * 32
    assert tuned * 10 < system


def test_the_users_malloc_settings_stand():
    applied, faults = probe(MALLOC_TRIM_THRESHOLD_="131072")
    assert applied == "False"
    assert faults >= 10 * 32  # glibc's behaviour, as the user asked


def test_an_unknown_choice_warns_and_leaves_glibc_alone():
    run = subprocess.run([sys.executable, "-W", "always", "-c", "import saelib.allocator as a; print(a._applied)"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "SAELIB_MALLOC": "sytem"})
    assert run.returncode == 0 and run.stdout.split() == ["False"]
    assert "SAELIB_MALLOC='sytem' is not one of keep, system" in run.stderr and "Traceback" not in run.stderr
