"""The job queue: rent a GPU, run a text-to-image job on it over SSH, fetch the image, and
give the instance back (reuse, keep warm, or destroy).

queue.py    pure decisions (which job next, which offer, which warm instance fits, keep-warm)
spec.py     validating what a user submits and shaping jobs as JSON
runner.py   driving one job on one instance over SSH (upload, start, progress, download)
service.py  the "jobs" loop: dispatch, recovery after a restart, the after-job rule
api.py      what the control socket calls: submit, list, get, cancel, pause, resume
"""
