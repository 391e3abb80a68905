"""The one exception type for mistakes a user can fix (a bad config value,
a missing file, a foreign checkpoint). Entry points print it as one line and
exit with status 1; any other exception is a bug and keeps its traceback."""


class UserError(ValueError):
  """Bad user input; the message names the bad value and what would be valid."""
