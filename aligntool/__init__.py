"""aligntool: align and compress language models from one YAML recipe."""

__version__ = "0.1.0"
