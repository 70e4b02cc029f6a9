"""resnets: the residual-network family in PyTorch."""

from .complexity import count_params_macs
from .deploy import deploy  # the function shadows the module name: import helpers from resnets.deploy
from .models import NetSpec, ResNet
from .registry import Entry, Paper, UnknownModelError, create_model, get_entry, list_models
from .weights import WeightsError, load_model, load_weights, save_weights

__version__ = "0.1.0"

__all__ = [
    "Entry",
    "NetSpec",
    "Paper",
    "ResNet",
    "UnknownModelError",
    "WeightsError",
    "count_params_macs",
    "create_model",
    "deploy",
    "get_entry",
    "list_models",
    "load_model",
    "load_weights",
    "save_weights",
]
