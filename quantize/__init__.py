"""Matryoshka weight quantization (MWQ): pure tensor math, no I/O."""

from d2moe.quantize.bitplanes import pack_bits, unpack_bits
from d2moe.quantize.grid import quantize_rtn, rtn_codes
from d2moe.quantize.metrics import sqnr_db
from d2moe.quantize.mwq import dequantize, quantize_mwq
from d2moe.quantize.types import MWQConfig, MWQTensor

__all__ = [
    "MWQConfig",
    "MWQTensor",
    "dequantize",
    "pack_bits",
    "quantize_mwq",
    "quantize_rtn",
    "rtn_codes",
    "sqnr_db",
    "unpack_bits",
]
