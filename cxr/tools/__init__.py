"""Tools over finished runs: explanations, embeddings, the OOD gate, export, predict, ablation."""
