"""CAP's contrastive half: InfoNCE math (nce), representation banks (banks), the
module table (modules), the objectives and their table (objectives: bank mode; online:
live references and the queue of queue.py)."""

from capscale.contrastive import objectives, online

__all__ = ["objectives", "online"]
