"""The engine's execution layer: one model runner per rank, a TP executor, and batched generation."""
