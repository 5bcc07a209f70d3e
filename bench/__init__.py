"""lorafleet's benchmarks; ``python -m bench`` runs the training-throughput and service ones."""
