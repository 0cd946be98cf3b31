"""Sampling from a trained VIM: KV-cached token sampling and images on every device."""
