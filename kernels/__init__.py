"""Batched heterogeneous adapter kernels and paged attention.

One file per op family. Each exposes a dispatcher (CUDA tensors -> Triton, CPU tensors -> the pure-PyTorch
reference beside it). This package imports only torch and triton.
"""
