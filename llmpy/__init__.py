"""llm.py: GPT-2, Llama 3 and the MatMul-free LM trained from scratch in Python, every layer's forward and backward
written by hand."""
__version__ = "0.1.0"
