"""The one exception every converter raises for input it cannot or must not convert."""

MAX_CHARS = 500  # A message quoting a hostile file's content stays readable.


class ConversionError(Exception):
  """A checkpoint cannot be converted; the message is one line, for the user."""

  def __init__(self, message: str):
    message = " ".join(str(message).split())
    super().__init__(message if len(message) <= MAX_CHARS else message[: MAX_CHARS - 3] + "...")
