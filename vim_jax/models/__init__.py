"""Flax modules without training logic: the tokenizer, VIM and the networks they use."""
