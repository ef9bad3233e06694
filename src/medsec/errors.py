"""One error type for what a user can get wrong; the CLI turns it into one line + exit code."""


class MedsecError(Exception):
    """A problem with the user's input or environment, reported without a traceback.

    ``exit_code`` lets commands with documented codes (e.g. ``medsec verify``) choose their own.
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
