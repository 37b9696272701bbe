"""Config files for ``experiments`` (``get_config()`` returns a ConfigDict)."""
