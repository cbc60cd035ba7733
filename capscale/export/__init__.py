"""Export: the pruned student as a plain Hugging Face checkpoint (masks baked in, or
heads and FFN neurons sliced away), its extra formats (ONNX, INT8, sparse), each checked
against it, and its model card."""
