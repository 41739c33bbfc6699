"""afpa-quotes: an example third-party protocol module for afpa (see module.py)."""
