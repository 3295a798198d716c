"""Reward functions for the example recipes (``reward.function: "rewards.gsm8k:accuracy"``: found in the recipe's
folder, examples/, before the installed packages)."""
