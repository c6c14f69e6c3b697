"""Errors a user can fix: each names the column, row ids, file or model that is wrong."""

import errno


class SdflowError(Exception):
    """A problem with the user's input or environment, reported as one paragraph and exit code 2."""


class PromptTableError(SdflowError):
    """The prompt table cannot be read, or its schema or values are invalid."""


class ModelError(SdflowError):
    """The model folder, hub id or its components cannot be read."""


class StorageError(SdflowError):
    """The output location cannot be written."""


def name_ids(ids, limit: int = 10) -> str:
    """Format row ids for an error message: the first `limit`, then how many more."""
    ids = list(ids)
    shown = ", ".join(repr(i) if isinstance(i, str) else str(i) for i in ids[:limit])
    more = len(ids) - limit
    return f"{shown} (and {more} more)" if more > 0 else shown


def retry_transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry what may pass next time, not input errors or out-of-memory (split instead)."""
    import torch

    try:
        state.result()
    except SdflowError:
        return False
    except torch.OutOfMemoryError:
        return False
    except OSError as e:  # a full disk or quota stays full: stop now, not after retry delays
        return e.errno not in (errno.ENOSPC, errno.EDQUOT)
    except BaseException:
        return True
    return False


# Retries for I/O tasks: a bounded number of tries, for transient faults only. The generation stages do not
# retry on their own: their per-row generators advance as they run, so a batch is retried whole from its seeds.
# One delay, not a list: Prefect's UI shows a list of delays as "NaNs".
TASK_RETRIES = {"retries": 2, "retry_delay_seconds": 5, "retry_condition_fn": retry_transient}


class RunError(Exception):
    """A failure of the run, not of its rows (every row tried fails the same way): stops it with exit code 1."""


def exception_chain(error: BaseException | None):
    """`error`, then what it was raised from or while handling (__cause__, else __context__), and so on; each once."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__
