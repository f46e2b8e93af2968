"""The one error extraction raises for bad input, so the CLI can print it instead of a traceback."""


class ExtractError(ValueError):
    """A model, image source, layer or token selection that extraction cannot use; the message says which."""
