"""Pretraining data: corpora (sources, deduplication, validation split) and token shards (prepare, read)."""
