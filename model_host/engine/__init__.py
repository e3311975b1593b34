"""Serving engine: sequences, a prefix-caching block manager over a paged latent cache, a
continuous-batching scheduler, the model runner, and the engine loop that ties them together."""
