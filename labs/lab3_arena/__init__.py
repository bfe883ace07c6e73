"""Lab 3: the arena, two models side by side through the gateway (see lab3_arena.ipynb)."""
