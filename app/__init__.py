"""The application layer: configuration, the training engine and its optimizer, checkpoints, distributed runs."""
