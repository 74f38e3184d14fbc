"""Reading and writing model weights: the name mapping per family, safetensors, GGUF."""
