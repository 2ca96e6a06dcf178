import os
import sys

from .cli import main

code = main()
if code and "torch.distributed" in sys.modules and getattr(sys.modules.get("saelib.distributed"), "joined", False):
    # A rank that failed under torchrun has printed its one-line error; leave now, so that no
    # teardown of torch.distributed at interpreter exit (its peers already gone) can turn that
    # clean exit into an abort (seen: SIGABRT after the error line, about one run in five).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
