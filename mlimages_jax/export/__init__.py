"""Exporting a checkpoint for other frameworks (PyTorch, TF SavedModel)."""
