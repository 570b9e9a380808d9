"""relay: an SMTP relay that really routes mail."""

#: The release; pyproject.toml reads it from here (one place for the number).
__version__ = "0.1.0"


def version() -> str:
    """The installed package's version, else (a plain checkout) ``__version__``."""
    from importlib import metadata

    try:
        return metadata.version("relay")
    except metadata.PackageNotFoundError:
        return __version__
