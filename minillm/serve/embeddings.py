"""Embeddings for the two APIs: the model's pooling (minillm.model.pooling), run by the engine."""

from minillm.model.pooling import embed_many

__all__ = ["embed_many"]
