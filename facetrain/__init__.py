"""facetrain: face-verification embedding training on Accelerate."""
