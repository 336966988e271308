"""The data wing's pure core: hierarchy, annotations, co-occurrence, statistics, the synthetic set (imports neither jax nor tensorflow)."""
