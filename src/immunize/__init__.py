"""immunize: make open-weight language models resist harmful fine-tuning, and measure how well they resist."""

__version__ = "0.1.0"
