"""ONNX and INT8 ONNX copies of an exported model, run with ONNX Runtime.

:func:`export_onnx` writes the model with torch's own exporter (``torch.onnx.export``,
the torch.export-based one: the TorchScript exporter is deprecated), batch and
sequence axes dynamic; :func:`quantize_int8` rewrites it with ONNX Runtime's dynamic
quantisation (weights stored as INT8, activations quantised per batch at run time, no
calibration data); :func:`onnx_logits` runs either on the CPU execution provider.
The checks that compare them with the PyTorch model live in capscale.export.formats.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# Above this many bytes of weights the ONNX file keeps them in a side file
# (model.onnx.data): a protobuf cannot exceed 2 GiB.
EXTERNAL_DATA_BYTES = 1_800_000_000


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide the exporter's and the quantiser's progress lines, notes and warnings (the
    errors still raise)."""
    loggers = [logging.getLogger(), logging.getLogger("torch.onnx")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def input_names(model: nn.Module) -> list[str]:
    """The inputs the ONNX model takes: ``input_ids``, ``attention_mask``, and
    ``token_type_ids`` where the model has more than one segment embedding."""
    names = ["input_ids", "attention_mask"]
    params = inspect.signature(model.forward).parameters
    if "token_type_ids" in params and getattr(model.config, "type_vocab_size", 0) > 1:
        names.append("token_type_ids")
    return names


def sample_inputs(model: nn.Module, batch: int = 2, length: int = 16) -> dict[str, torch.Tensor]:
    """A random batch of ``input_names(model)`` (the export traces it; the values do not
    matter, its sizes are made dynamic)."""
    g = torch.Generator().manual_seed(0)
    vocab = int(getattr(model.config, "vocab_size", 1000))
    ids = torch.randint(min(5, vocab - 1), vocab, (batch, length), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out["attention_mask"][0, length // 2:] = 0
    if "token_type_ids" in input_names(model):
        out["token_type_ids"] = torch.zeros_like(ids)
    return out


def export_onnx(model: nn.Module, path: str | Path, opset: int = 18) -> Path:
    """Write ``model`` (a Hugging Face sequence classifier, eval mode, CPU) to ``path``
    with dynamic batch and sequence axes; its one output is ``logits``.

    Args:
        model: the model to export (the loaded export, stock or trust_remote_code).
        path: the ``.onnx`` file to write (its folder is created).
        opset: the ONNX opset.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    inputs = sample_inputs(model)
    names = list(inputs)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    size = sum(p.numel() * p.element_size() for p in model.parameters())

    class Logits(nn.Module):  # positional inputs in a fixed order, a tensor out
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
            extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              **extra, return_dict=True).logits

    with _quiet(), torch.no_grad():
        torch.onnx.export(Logits(), tuple(inputs[n] for n in names), str(path), dynamo=True,
                          input_names=names, output_names=["logits"],
                          dynamic_shapes=tuple({0: batch, 1: seq} for _ in names),
                          opset_version=opset, external_data=size > EXTERNAL_DATA_BYTES,
                          verbose=False)
    return path


def quantize_int8(src: str | Path, dst: str | Path, per_channel: bool = True) -> Path:
    """ONNX Runtime dynamic quantisation of ``src`` (its default operator set): the
    weights of matrix products to signed INT8 (one scale per output channel when
    ``per_channel``) and the activations entering them to UINT8, scaled per batch at run
    time; embedding tables to 8 bits, dequantised after the look-up; layer norms,
    softmax and biases stay float32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = Path(dst)
    with _quiet():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8,
                         per_channel=per_channel,
                         use_external_data_format=Path(f"{src}.data").is_file())
    return dst


def onnx_session(path: str | Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session of ``path`` (``threads``: intra-op threads; default
    torch's setting, so the checks share the CPU as the rest of the run does)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_logits(session: Any, batch: dict[str, torch.Tensor]) -> np.ndarray:
    """The session's logits for the model inputs in ``batch`` (extra keys ignored)."""
    wanted = {i.name for i in session.get_inputs()}
    feed = {k: v.cpu().numpy().astype(np.int64) for k, v in batch.items() if k in wanted}
    if "token_type_ids" in wanted and "token_type_ids" not in feed:
        feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
    return session.run(["logits"], feed)[0]
