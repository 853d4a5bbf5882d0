"""Memory Decoder (Cao et al., 2025): a small decoder trained to imitate a datastore's p_kNN."""
