"""The op layer: every depthwise convolution and attention of the model goes through here.

Backends are chosen in :mod:`uniformer_fast.ops.backend`; ``"reference"`` (plain PyTorch) is the
ground truth for all others.
"""
from .self_attention import attention
from .backend import (BACKENDS, BackendUnavailableError, available_backends, backend_for, get_backend,
                      set_backend, use_backend)
from .dpe_norm import dpe_bn_stats, dpe_layernorm
from .batchnorm import batch_stats, fold_into_pointwise, update_running_stats
from .depthwise_conv import dwconv3d
from .fully_connected import cpu_native_dtypes, linear
from .local_mhra import local_mhra_tail, local_mhra_tail_bn_stats
from .feed_forward import mlp
from .reference import (attention_reference, dpe_layernorm_reference, dwconv3d_reference,
                        linear_reference, mlp_reference)
from .reference import local_mhra_tail_reference

__all__ = [
    "BACKENDS", "BackendUnavailableError", "attention", "cpu_native_dtypes", "attention_reference", "available_backends", "backend_for",
    "dpe_layernorm", "dpe_layernorm_reference", "dwconv3d", "dwconv3d_reference", "get_backend",
    "linear", "linear_reference", "mlp", "mlp_reference", "set_backend",
    "use_backend", "local_mhra_tail", "local_mhra_tail_reference", "dpe_bn_stats",
    "local_mhra_tail_bn_stats", "batch_stats", "fold_into_pointwise", "update_running_stats",
]
