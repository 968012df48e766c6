"""The tensor tests use tiny tensors: every one runs on one intra-op thread (see tests/_threads.py)."""
from _threads import one_thread  # noqa: F401
