"""uniformer_fast: the UniFormer video model with fused kernels, state-dict compatible with the
official Sense-X/UniFormer checkpoints."""
from . import ops
from .apps.evaluate import evaluate
from .apps.extract import extract
from .apps.explain import explain
from .checkpoint import load_checkpoint
from .data.classes import class_names
from .export import export_onnx
from .model import UniFormer, create_model, list_models, uniformer_base, uniformer_small

__version__ = "0.1.0"

__all__ = ["UniFormer", "class_names", "create_model", "evaluate", "explain", "export_onnx", "extract", "list_models",
           "load_checkpoint", "ops",
           "uniformer_base", "uniformer_small", "__version__"]
