"""Bronze: source mappings, validation into the canonical schema, quarantine, and the
synthetic data generator."""
