"""The data layer's error: what is wrong with a dataset, a split file or an image, as one line."""
from utils.cli import ReportedError


class DataError(ReportedError):
    """A dataset that cannot be used as it is (missing, damaged, too small): one line, exit status 2."""
