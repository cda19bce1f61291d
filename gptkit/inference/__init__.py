"""Inference: the one sampling core (`generate`), the continuous-batching engine (`engine`), the
terminal chat (`chat`), int8/int4 Linear layers (`qlinear`) and quantized runs (`quantize`)."""
