"""Errors of the export package that the CLI turns into one clear line (never a traceback)."""


class ExportError(Exception):
    """Export, verification or benchmarking cannot go on; the message says why and what to do."""


class UnsupportedModelError(ExportError):
    """The model has a tower (or a feature of one) that fedprompt cannot export."""


class WeightsUnavailableError(ExportError):
    """Pretrained weights are unknown or cannot be had (e.g. a tag that needs a download, offline)."""
