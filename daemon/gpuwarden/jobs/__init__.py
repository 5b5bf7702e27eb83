"""The job queue: rent a GPU, run a text-to-image job on it over SSH, fetch the image, and
give the instance back (reuse, keep warm, or destroy).

decisions.py  pure decisions (which job next, which offer, which warm instance fits, keep-warm)
spec.py       validating what a user submits and shaping jobs as JSON
limits.py     the bounds a job spec must stay within (shared with the control socket)
runner.py     driving one job on one instance over SSH (upload, start, progress, download)
renting.py    renting an instance for a job, waiting for SSH, putting a job back in the queue
service.py    the "jobs" loop: dispatch, recovery after a restart, the after-job rule

The control socket's handlers for jobs live in control/jobs.py.
"""
