"""relay: an SMTP relay that really routes mail."""

__version__ = "0.1.0"
