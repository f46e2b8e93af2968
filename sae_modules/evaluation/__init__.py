"""Measuring SAEs the way the paper does: monosemanticity, taxonomy depth, steering, reconstruction.

Every metric here streams over images, so the paper's scale (50,000 images x 65,536 latents)
runs in bounded memory; the static latent browser and the report are built from their results.
"""
