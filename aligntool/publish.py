"""Sharing a trained model: the model card and `aligntool push`."""
