"""Real low-bit execution on the CPU: packed linear layers, conversion of a simulated model, checks, benchmark."""
from lowbit.kernels.convert import LayerKernel, kernel_table, memory_bytes, to_real

__all__ = ["LayerKernel", "kernel_table", "memory_bytes", "to_real"]
