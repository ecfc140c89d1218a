"""Names of the KV policies, the kind of budget plan each uses, and their knob defaults.

Kept apart from ``policies.py`` (which needs torch) so that building the command line, which
offers these names as choices, does not import torch.
"""

from __future__ import annotations

# policy name -> how its budgets are split (memory.budgets.budget_plan)
PLAN_KINDS: dict[str, str] = {
    "full": "full",
    "sliding": "uniform",
    "streaming": "uniform",
    "h2o": "uniform",
    "snapkv": "uniform",
    "pyramidkv": "pyramid",
    "scalekv": "scalekv",
    "scalekv-allq": "scalekv",
    "snapkv-allq": "uniform",
}
POLICIES = tuple(PLAN_KINDS)

# per named policy, its defaults for knobs left unset (None): selection knobs (make_policy) and
# budget knobs (BudgetSettings.drafter_mode); unlisted knobs take the general defaults
POLICY_DEFAULTS: dict[str, dict[str, str | int]] = {
    "scalekv": {"score_queries": "window", "score": "softmax", "pool_kernel": 5, "drafter_mode": "calibrated"},
    # all-query scores are already smooth: pooling them costs ~1 dB on var-tiny at 10%
    "scalekv-allq": {"score_queries": "all", "score": "softmax", "pool_kernel": 1, "drafter_mode": "calibrated"},
    # uniform budgets scored by every query: the best measured on the 8-layer var-tiny at 10%
    "snapkv-allq": {"score_queries": "all", "score": "softmax", "pool_kernel": 1},
}
SCORE_QUERIES = ("window", "all")
SCORES = ("softmax", "logits")
from .profile import DRAFTER_MODES  # noqa: E402,F401  (re-exported with the other names)


def needs_profile(policy: str) -> bool:
    """Whether a named policy splits its budgets by the model's scale profile."""
    return PLAN_KINDS.get(policy) == "scalekv"
