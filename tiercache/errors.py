"""The exceptions tiercache raises besides the standard ones (KeyError, TypeError, ValueError)."""


class TiercacheError(Exception):
    """Base of tiercache's own exceptions."""


class CacheUnavailable(TiercacheError):
    """Redis could not be reached or did not answer in time; the cause is chained."""
