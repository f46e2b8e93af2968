"""The one error extraction raises for bad input, so the CLI can print it instead of a traceback."""

from sae_modules.errors import VlmSteerError


class ExtractError(VlmSteerError):
    """A model, image source, layer or token selection that extraction cannot use; the message says which."""
