"""Errors a user can fix. The CLI prints them as one line and exits with status 2."""


class AutoprogError(Exception):
    """Base class for mistakes in input, configuration or environment that the user can fix."""


class ConfigError(AutoprogError, ValueError):
    """An option, config file or schedule is invalid."""


class DataError(AutoprogError):
    """A dataset is missing or malformed."""


class DivergedError(AutoprogError):
    """Training diverged (a non-finite loss, gradient or sample): stopped before it could be saved or scored."""


def one_line(error: BaseException) -> str:
    """The message of ``error`` as one line: a data-loader worker re-raises an error with its whole traceback in
    the message, whose last line is the original one."""
    text = str(error)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(error).__name__
    if "Original Traceback" not in text:
        return " ".join(lines)
    last = lines[-1]
    prefix = f"{type(error).__module__}.{type(error).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def first_line(error: BaseException) -> str:
    """``Type: first line of the message``: a library's error (a load that failed) in one short line."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


_NO_MEMORY = ("can't allocate memory", "not enough memory", "out of memory", "Storage size calculation overflowed")


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says that what was asked for does not fit in (host or device) memory."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    return isinstance(error, RuntimeError) and any(s in str(error) for s in _NO_MEMORY)


_WARNED: set[str] = set()  # what warn(once=True) has said since forget_warnings()


def warn(message: str, once: bool = False) -> None:
    """Print ``autoprog: warning: message`` (on the main process of a launch); ``once``: not again until
    :func:`forget_warnings` (a setting's warning, met by every run of a comparison)."""
    import os
    import sys

    if once:
        if message in _WARNED:
            return
        _WARNED.add(message)
    if os.environ.get("RANK", "0") == "0":
        print(f"autoprog: warning: {message}", file=sys.stderr)


def forget_warnings() -> None:
    """Let ``warn(once=True)`` say its messages again (each command line starts afresh)."""
    _WARNED.clear()


def launch_note(processes: int) -> str:
    """How a run of several processes is continued: by a launch of as many (its global batch follows)."""
    return f" in a launch of {processes} processes, as this one" if processes > 1 else ""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped training at a step boundary, after a checkpoint of that step was written;
    ``resume``: the flag that continues the run (a comparison is continued by running it again)."""

    def __init__(self, message: str, resume: str | None = None):
        self.message, self.resume = message, resume
        super().__init__(self.advice(None))

    def advice(self, command: str | None) -> str:
        """The message with how to continue, for the ``command`` that was stopped."""
        if self.resume is None:
            return self.message
        if command == "compare":
            return f"{self.message} (run the same compare command again to continue: finished runs are reused, " \
                   "this one resumes)"
        return f"{self.message} (continue with {self.resume})"
