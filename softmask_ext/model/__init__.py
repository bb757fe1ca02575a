"""The Dream model (Qwen2 architecture with bidirectional attention), its checkpoint I/O and tokenizer."""

from .config import DreamConfig
from .dream import DreamModel, DreamOutput
from .family import ModelFamily, family_of, load_model, register_family, registered_families
from .loading import load_pretrained, save_pretrained
from .tokenizer import load_tokenizer

__all__ = ["DreamConfig", "DreamModel", "DreamOutput", "ModelFamily", "family_of", "load_model", "register_family",
           "registered_families", "load_pretrained", "save_pretrained", "load_tokenizer"]
