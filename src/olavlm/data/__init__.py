"""Datasets in LLaVA format: templates, segment tokenization, images, collation, samplers, checks."""
