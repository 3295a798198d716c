"""The dry run: a recipe resolved without weights or data, and its memory plan per GPU."""
