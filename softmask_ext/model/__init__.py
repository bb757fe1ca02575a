"""The Dream model (Qwen2 architecture with bidirectional attention), its checkpoint I/O and tokenizer."""

from .config import DreamConfig
from .dream import DreamModel, DreamOutput
from .loading import load_pretrained, save_pretrained
from .tokenizer import load_tokenizer

__all__ = ["DreamConfig", "DreamModel", "DreamOutput", "load_pretrained", "save_pretrained", "load_tokenizer"]
