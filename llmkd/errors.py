"""The one exception type for user mistakes and environment problems.

Raised with a message that names the bad key, file or value and, where there is one, the fix.
The CLI prints it as a single line and exits with status 2: no traceback for a user's mistake.
"""


class LlmkdError(Exception):
    exit_code = 2
