"""Adapters: the delta vocabulary, the artifact format, and the offline trainer. Imports neither server nor kernels."""
