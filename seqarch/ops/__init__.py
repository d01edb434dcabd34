"""Functional kernels. Each op keeps a plain reference (`*_ref`) beside its fast path."""
