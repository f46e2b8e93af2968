"""A static latent browser: one HTML page, its script and stylesheet, and a PNG grid per latent."""
