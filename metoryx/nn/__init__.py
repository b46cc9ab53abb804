"""Layers and layer functions, one topic per file; ``metoryx`` re-exports the public names."""
