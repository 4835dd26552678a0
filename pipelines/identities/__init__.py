"""Real identity exemplars: pools of photos and their inpainting masks."""
