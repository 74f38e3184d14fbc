"""Evaluation of circuit-breaker models: generation, likelihood and representation metrics, a
harmfulness probe and an embedding-space attack."""
