"""The one exception type users see for bad input.

Every check in sdanim raises `SdanimError` with a message that names the parameter and
ends with what was received (KerasHub's convention):

    "frames must be at least 2. Received: frames=1"

The CLI turns it into one line on stderr and exit status 2, with no traceback.
"""


class SdanimError(ValueError):
    """Bad input or an unusable environment, described in one line."""


def check(condition: bool, message: str) -> None:
    """Raises `SdanimError(message)` unless `condition` holds."""
    if not condition:
        raise SdanimError(message)
