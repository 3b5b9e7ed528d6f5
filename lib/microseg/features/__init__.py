"""Gold features: point-in-time user features."""
