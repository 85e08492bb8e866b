"""llama2: the whole Llama 2 system in one package."""

from .config import ModelConfig
from .errors import Llama2Error
from .model import Transformer
from .checkpoint import load_model, save_model

__all__ = ["ModelConfig", "Transformer", "Llama2Error", "load_model", "save_model"]

__version__ = "0.1.0"
