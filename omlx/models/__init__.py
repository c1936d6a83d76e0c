"""Finding and describing the model folders omlx serves."""
