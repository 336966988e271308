"""Using a trained network on image files: classification and features."""
