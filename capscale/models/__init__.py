"""Models: loading task models and tokenizers, freezing, the representation tap, the
encoder adapters and their specs, and inspection of an unknown encoder."""
