"""Lab 1: a streaming chat with the bundled SmolLM2 model (see lab1_chat.ipynb)."""
