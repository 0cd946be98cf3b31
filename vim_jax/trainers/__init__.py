"""Trainers (tokenizer, vim, classifier, quickstart), their pure train steps and what they share."""
