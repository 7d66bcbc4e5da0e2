"""Hallucination benchmarks (POPE, AMBER's discriminative task) scored as their reference scripts score them."""
