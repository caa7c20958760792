"""Triton kernels for the paged KV cache.

The submodules import triton at their top: import them only once a Triton backend was chosen.
"""
