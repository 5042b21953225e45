"""The one exception every converter raises for input it cannot or must not convert."""


class ConversionError(Exception):
  """A checkpoint cannot be converted; the message is one line, for the user."""

  def __init__(self, message: str):
    super().__init__(" ".join(str(message).split()))
