"""Building blocks shared by the architectures: norms, rotary embeddings, MLPs, attention."""
