"""Matryoshka weight quantization (MWQ): pure tensor math, no I/O."""

from d2moe.quantize.types import MWQConfig, MWQTensor

__all__ = ["MWQConfig", "MWQTensor"]
