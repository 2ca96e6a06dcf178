"""saelib: a Jupyter-first workbench for sparse-autoencoder research.

The notebooks in ``notebooks/`` import this package; each module holds one concept
(see DESIGN.md's data flow): ``models`` loads language models and checks hook names,
``data`` gives token windows, ``harvest`` and ``store`` collect activations on disk,
``sae`` holds the SAE modules and their folders (``sparse_ops`` their sparse kernels),
``train`` trains them, ``toy`` makes data with known features, ``metrics`` scores them,
``nb`` prepares a notebook, ``profile`` scales experiments between CI and real runs,
``report`` runs all notebooks into offline HTML reports, ``zoo`` builds the embedded model.
"""

import os as _os
import sys as _sys

# In a Jupyter kernel, OpenMP's idle threads spin while waiting for work; on a machine where
# another process holds a core, that made notebook 01 take 334 s instead of 111 s (the same
# loop in a plain script keeps its speed). Sleeping at once (PASSIVE) fixed that but cost
# 10-20% on a quiet machine in loops of tiny ops, as the threads must be woken for every op.
# A short spin before sleeping (GOMP_SPINCOUNT, about 0.2 ms; libgomp's default is about
# 3 ms) keeps most of both: see benchmarks/README.md. The spin count wins over the policy in
# libgomp; the policy is for other OpenMP runtimes. Both must be set before torch loads
# OpenMP, so only when saelib is imported first (as every notebook's first cell does), and
# never when the user chose either.
_KERNEL_OPENMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "20000"}
if ("ipykernel" in _sys.modules and "torch" not in _sys.modules
        and not any(name in _os.environ for name in _KERNEL_OPENMP_ENV)):
    _os.environ.update(_KERNEL_OPENMP_ENV)

# MKL's vector math picks each function's kernel at its first call; two threads making that
# first call at once can get a low-accuracy kernel for one half of a tensor (saelib.vml).
from .vml import resolve_dispatch as _resolve_vml_dispatch  # noqa: E402

_resolve_vml_dispatch()

# glibc keeps freed blocks for reuse rather than page-faulting every tensor in afresh
# (saelib.allocator): forward passes on a CPU ran 1.3x faster. SAELIB_MALLOC=system opts out.
from .allocator import keep_freed_blocks as _keep_freed_blocks  # noqa: E402

_keep_freed_blocks()

from . import nb  # noqa: E402
from .profile import PROFILES, Profile, profile  # noqa: E402

__version__ = "0.1.0"
__all__ = ["PROFILES", "Profile", "nb", "profile", "__version__"]
