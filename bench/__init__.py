"""fayt-portals' benchmark suite: each row is libportal against the tool a
Python user would pick instead, measured in the same run on this machine.

    python -m bench            the full run (a few minutes)
    python -m bench --quick    a short smoke run (CI): same rows, fewer iterations
    python -m bench --only lock,create

Ratios are ours / peer for times (lower is better) and ours / peer for
throughputs (higher is better); the target column says which.
"""
