"""Developer tools: tiny random mPLUG-Owl checkpoints for tests, the offline demo and benchmarks."""
