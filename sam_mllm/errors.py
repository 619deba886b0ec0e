"""The one base class of the errors a user can fix (a config key, a file, a name, the data).

Entry points (:mod:`sam_mllm.cli`) print such an error as one line on stderr and exit with code 2;
anything else is a bug and keeps its traceback. Torch-free, so every module can import it.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: the message says what is wrong and where, in one line."""
