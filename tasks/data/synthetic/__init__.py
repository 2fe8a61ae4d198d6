"""Small synthetic datasets, each written in exactly one on-disk format (demos and tests train on them)."""
