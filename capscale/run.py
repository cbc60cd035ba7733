"""capscale entry point: prune an encoder with CAP, evaluate it, export it.

One process (CPU or one GPU)::

    python -m capscale.run --config capscale/configs/demo_minilm_tweets.yaml
    python -m capscale.run --config capscale/configs/bert_base_glue.yaml \
        data.dataset_config=qqp pruning.final_sparsity=0.97

``capscale``, ``python -m capscale.run`` and ``accelerate launch capscale/run.py`` all
call the same :func:`capscale.cli.main`; its subcommands::

    capscale prune --config X.yaml [key=value ...]      # = python -m capscale.run
    capscale prune --config X.yaml resume=latest        # continue a killed run
    capscale evaluate --config X.yaml [--model DIR]
    capscale export --config X.yaml --checkpoint latest
    capscale report outputs/run

Several GPUs on one node (data parallel, or sharded with ZeRO-3 / FSDP2)::

    accelerate launch --config_file ds_configs/ddp.yaml capscale/run.py \
        --config capscale/configs/bert_base_glue.yaml
    accelerate launch --config_file ds_configs/zero3.yaml capscale/run.py \
        --config capscale/configs/roberta_large_zero3.yaml
    accelerate launch --config_file ds_configs/fsdp2.yaml capscale/run.py --config ...
    torchrun --nproc_per_node 8 capscale/run.py --config ... strategy=zero3

Two CPU processes (what CI runs)::

    CAPSCALE_CPU=1 torchrun --nproc_per_node 2 capscale/run.py --config ... strategy=fsdp2

Arguments after the config are ``key=value`` overrides of any config field.
Outputs in ``output_dir``: ``config.yaml``, ``teacher/`` (when fine-tuned here),
``pruned/model`` (plain Hugging Face), ``pruned/masks.safetensors``,
``pruned/sparsity_report.json``, ``history.jsonl``, ``evals.json``, ``results.json``,
``report/`` (markdown + HTML + plots), ``checkpoints/`` (with ``checkpoint.every_steps``),
``tracking/`` (TensorBoard, when installed), ``cache/`` (tokenised data for a requeued job).

Exit codes: 0 done (the export was reloaded with transformers alone and reproduces the
student); 2 a config, data or model error (one line on stderr says what to change;
nothing was loaded); 3 a non-finite loss stopped the run; 4 the export did not
reproduce the student (the trained student is kept as a checkpoint).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python capscale/run.py` / `accelerate launch capscale/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from capscale.cli import exit_program, main

__all__ = ["main"]

if __name__ == "__main__":
    exit_program(main())
