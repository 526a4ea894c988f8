"""InternLM pretraining framework."""

__version__ = "0.1.0"
