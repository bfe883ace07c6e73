"""Lab 2: chat with any OpenAI-compatible server through the openai SDK."""
