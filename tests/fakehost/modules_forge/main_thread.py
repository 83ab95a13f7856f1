"""Fake Forge ``modules_forge.main_thread``: Forge runs generation on its main thread and the caller
waits for the result; here the work runs in the calling thread (there is no GPU to own), and the
calls are counted so tests see generation went through it."""

calls = 0


def run_and_wait_result(func, *args, **kwargs):
    global calls
    calls += 1
    return func(*args, **kwargs)
