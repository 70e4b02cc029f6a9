"""Studies that check the papers' claims on a user's own models and data.

Each study is a function returning its numbers as a dict; given `out_dir`, it also writes
`<study>.json` and `<study>.png` there. `resnets analyze <study>` runs them from the shell.
"""

from .ablation import ablation
from .common import PALETTE, StudyError
from .degradation_curves import degradation
from .erf import receptive_field
from .grad_cam import gradcam
from .lesioning import lesion, lesion_compare
from .shortcut_coverage import shortcut
from .signal_propagation import signal

__all__ = [
    "PALETTE",
    "StudyError",
    "ablation",
    "degradation",
    "gradcam",
    "lesion",
    "lesion_compare",
    "receptive_field",
    "shortcut",
    "signal",
]
