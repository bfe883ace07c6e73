"""Compression: quantize, prune and distill real models, and measure what each costs."""
