"""Post-training compression: EvoPress search and JLCM codebooks."""
