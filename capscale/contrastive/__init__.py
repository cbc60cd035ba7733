"""CAP's contrastive half: InfoNCE math (nce), representation banks (banks), the
online queue (queue), the module table (modules) and the objectives (objectives)."""
