"""saelib: a Jupyter-first workbench for sparse-autoencoder research.

The notebooks in ``notebooks/`` import this package; each module holds one concept
(see DESIGN.md's data flow): ``models`` loads language models and checks hook names,
``data`` gives token windows, ``harvest`` and ``store`` collect activations on disk,
``sae`` holds the SAE modules and their folders (``sparse_ops`` their sparse kernels),
``train`` trains them, ``toy`` makes data with known features, ``metrics`` scores them,
``nb`` prepares a notebook, ``profile`` scales experiments between CI and real runs,
``report`` runs all notebooks into offline HTML reports, ``zoo`` builds the embedded model.
"""

from . import nb
from .profile import PROFILES, Profile, profile

__version__ = "0.1.0"
__all__ = ["PROFILES", "Profile", "nb", "profile", "__version__"]
