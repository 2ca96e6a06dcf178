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
# loop in a plain script keeps its speed). Sleeping idle threads cost about 10% on a quiet
# machine for loops of tiny ops and nothing measurable for real SAE shapes; see
# saelib.threads and benchmarks/README.md. It must be set before torch loads OpenMP, so only
# when saelib is imported first (as every notebook's first cell does), and never over a
# value the user chose.
if "ipykernel" in _sys.modules and "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import nb  # noqa: E402
from .profile import PROFILES, Profile, profile  # noqa: E402

__version__ = "0.1.0"
__all__ = ["PROFILES", "Profile", "nb", "profile", "__version__"]
