"""Datasets and collators: image-text pairs, instructions, the demo set."""
