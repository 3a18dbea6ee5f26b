"""Error types that carry enough context for a user to fix the input.

Every message names the file, key or value at fault and says how to fix it.
"""

import json
import os
import time


class FFFVDIError(Exception):
    """Base class of the project's user-facing errors."""


class ConfigError(FFFVDIError, ValueError):
    """A configuration key holds a value we cannot use."""

    def __init__(self, key: str, value, fix: str):
        self.key, self.value, self.fix = key, value, fix
        super().__init__(f"config key '{key}' = {value!r}: {fix}")


class DataError(FFFVDIError, RuntimeError):
    """A dataset file (shard, index, manifest, frame, mask) is missing or corrupt."""


class WeightsError(FFFVDIError, RuntimeError):
    """Model weights are missing, gated, corrupt or in an unexpected layout."""


class InputError(FFFVDIError, ValueError):
    """User input to a command-line tool (video, masks, paths) cannot be used."""


def write_launcher_error(message: str) -> None:
    """Give torchrun this process's error as one line. torchrun points each worker at its own error
    file (TORCHELASTIC_ERROR_FILE) and prints the first failed worker's as the "Root Cause" of its
    ChildFailedError report; without one that reads "To enable traceback see: <url>" and buries our
    message. The format is torch.distributed.elastic's ErrorHandler's, with the line as the traceback.
    Outside torchrun this does nothing."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    extra = {"py_callstack": message, "timestamp": str(int(time.time()))}
    record = {"message": {"message": message, "extraInfo": extra}}
    try:
        with open(path, "w") as f:
            json.dump(record, f)
    except OSError:
        pass  # the message was printed already; torchrun then shows its generic root cause


def run_command(work, writing=None, prog: str = "error") -> int:
    """A command-line tool's exit code for `work()`: 0 when it returns; otherwise one line on stderr,
    no traceback: 2 for input the user can fix (an FFFVDIError names it), 1 for an OS error the
    checks up front cannot foresee (a full disk, a failing drive) while writing `writing`."""
    import sys

    from fff_vdi.utils.paths import os_error_text

    try:
        work()
    except FFFVDIError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{prog}: {os_error_text(e, writing)}", file=sys.stderr)
        return 1
    return 0
