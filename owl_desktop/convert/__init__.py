"""HF mPLUG-Owl checkpoint → model bundle (vision weights + quantized GGUF), LoRA merge, quantization."""
