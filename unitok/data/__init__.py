"""Data: the shapes renderer and every dataset."""
