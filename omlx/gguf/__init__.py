"""GGUF model files (llama.cpp's format) read, checked and converted into MLX model folders."""
