"""The one error type of export/: a file or request that cannot be exported, quantized or verified."""


class ExportError(ValueError):
    """The message names the file or value and says what is wrong."""
