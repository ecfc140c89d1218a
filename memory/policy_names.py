"""Names of the KV policies and the kind of budget plan each uses.

Kept apart from ``policies.py`` (which needs torch) so that building the command line, which
offers these names as choices, does not import torch.
"""

from __future__ import annotations

PLAN_KINDS: dict[str, str] = {
    "full": "full",
    "sliding": "uniform",
    "streaming": "uniform",
    "h2o": "uniform",
    "snapkv": "uniform",
    "pyramidkv": "pyramid",
    "scalekv": "scalekv",
}
POLICIES = tuple(PLAN_KINDS)
