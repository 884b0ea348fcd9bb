"""OpenAI-Triton kernels, each beside its torch reference, with a dispatch() that falls back to the reference."""
