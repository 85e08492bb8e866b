"""Inference: the step-level generation engine, sampling, sequence scoring, and the CPU decoding kernels."""
