"""The NumPy reference layers: one module per layer family, forward and backward side by side.

Conventions (as in llm.c): outputs first, then inputs. Parameter gradients are ACCUMULATED (+=) so that
gradient accumulation needs no copy; the gradient flowing into the residual stream is accumulated too, other
input gradients are overwritten. Shapes use B batch, T time, C channels, NH heads, K key/value heads, hs = C/NH,
OC out channels, N = B*T rows, V vocab. Functions are dtype-generic (float32 for training, float64 for gradient
checks). Optional `scratch` arguments let a caller pass preallocated temporaries so that a step allocates nothing.
"""
from .encoder import encoder_forward, encoder_backward
from .layernorm import layernorm_forward, layernorm_backward
from .matmul import matmul_forward, matmul_backward, colsum_add
from .gelu import gelu_forward, gelu_backward
from .residual import residual_forward, residual_backward
from .attention import attention_forward, attention_backward, attention_decode, kv_cache_write
from .classifier import crossentropy_forward, fused_classifier
from .adamw import adamw_update
from .rmsnorm import rmsnorm_forward, rmsnorm_backward
from .rope import rope_forward, rope_backward, rope_frequencies, rope_table
from .swiglu import swiglu_forward, swiglu_backward
from .bitlinear import (bitlinear_forward, bitlinear_backward, bitlinear_packed_forward, quantize_activations,
                        quantize_weight, round_half_away, unpack_codes)
from .mlgru import mlgru_forward, mlgru_backward, lower_bounds_forward, lower_bounds_backward

__all__ = [
    "encoder_forward", "encoder_backward", "layernorm_forward", "layernorm_backward",
    "matmul_forward", "matmul_backward", "colsum_add", "gelu_forward", "gelu_backward", "residual_forward",
    "residual_backward", "attention_forward", "attention_backward", "attention_decode", "kv_cache_write",
    "crossentropy_forward", "fused_classifier", "adamw_update", "rmsnorm_forward", "rmsnorm_backward",
    "rope_forward", "rope_backward", "rope_frequencies", "rope_table", "swiglu_forward", "swiglu_backward",
    "bitlinear_forward", "bitlinear_backward", "bitlinear_packed_forward", "unpack_codes",
    "quantize_activations", "quantize_weight", "round_half_away", "mlgru_forward", "mlgru_backward",
    "lower_bounds_forward", "lower_bounds_backward",
]
