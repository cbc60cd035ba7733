"""Models: loading task models and tokenizers, freezing, the representation tap, the
encoder adapters and their specs, inspection of an unknown encoder, and activation
checkpointing of the encoder layers."""

from capscale.models import families as _families  # noqa: F401  (registers them)
