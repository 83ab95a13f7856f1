"""Fake ``modules.shared_state.State`` (the same method set on both hosts)."""

import time


class State:
    skipped = False
    interrupted = False
    stopping_generation = False
    job = ""
    job_no = 0
    job_count = 0
    sampling_step = 0
    sampling_steps = 0
    textinfo = None
    time_start = None

    def __init__(self):
        self.jobs_begun = []
        self.jobs_ended = 0

    def interrupt(self):
        self.interrupted = True

    def stop_generating(self):
        self.stopping_generation = True

    def skip(self):
        self.skipped = True

    def begin(self, job: str = "(unknown)"):
        from modules import devices

        self.sampling_step = 0
        self.time_start = time.time()
        self.job_count = -1
        self.job_no = 0
        self.skipped = False
        self.interrupted = False
        self.stopping_generation = False
        self.textinfo = None
        self.job = job
        self.jobs_begun.append(job)
        devices.torch_gc()

    def end(self):
        from modules import devices

        self.job = ""
        self.job_count = 0
        self.jobs_ended += 1
        devices.torch_gc()
