"""Weights in and out of other libraries' formats: Hugging Face model directories (hf.py)."""

from tformer.interop.common import InteropError
from tformer.interop.hf import Imported, export_hf, import_hf, save_imported

__all__ = ["Imported", "InteropError", "export_hf", "import_hf", "save_imported"]
