"""Stage 4: downstream evaluation of embeddings (patch probes, retrieval, ABMIL, survival, model ranking)."""
