"""Model families (Dream, LLaDA, MDLM): their models, configs and conventions, checkpoint I/O, tokenizers.

Importing this package imports every built-in family's module, which registers the family (see :mod:`.family`).
"""

from .config import DreamConfig
from .dream import DreamModel, DreamOutput
from .family import ModelFamily, family_of, load_model, register_family, registered_families
from .llada import LLaDAModel
from .llada_config import LLaDAConfig
from .loading import load_pretrained, save_pretrained
from .mdlm import MDLMConfig, MDLMModel
from .tokenizer import load_tokenizer

__all__ = [
    "DreamConfig",
    "DreamModel",
    "DreamOutput",
    "LLaDAConfig",
    "LLaDAModel",
    "MDLMConfig",
    "MDLMModel",
    "ModelFamily",
    "family_of",
    "load_model",
    "register_family",
    "registered_families",
    "load_pretrained",
    "save_pretrained",
    "load_tokenizer",
]
