"""A run's life on disk: rundir (the run folder), runlock (one writer), lifecycle (claim, begin, save,
end, and every other way out), stopsignals (signals as stop requests), runlog (TensorBoard and progress
lines) and runsummary (summary.json, statuses, the divergence check).
"""
