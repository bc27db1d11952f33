"""crossmap: carry interpretability tools between LLMs through ridge maps of their residual streams.

Stages, in the order data flows through them (a module never imports a later one):
    sharding -> models -> activations -> ridge -> sae -> verbalize -> evaluate -> pipeline -> report -> cli
"""

__version__ = "0.1.0"
