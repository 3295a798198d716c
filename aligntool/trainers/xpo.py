"""XPO: Exploratory Preference Optimization (Xie et al. 2024, arXiv 2405.21046) -- online DPO with a reference sample
per prompt and the exploration term alpha * sum_t log pi(y~_t); see aligntool/trainers/online_dpo.py."""

from aligntool.trainers.online_dpo import XPOConfig as AlgoConfig
from aligntool.trainers.online_dpo import pipeline

__all__ = ["AlgoConfig", "pipeline"]
