"""Stage 2, `make head`: light heads on cached features, and the run that trains and evaluates them.

Modules: `validation` (input checks), `base` (the `Head` contract and the saved-head
directory), `logistic` and `dense` (the two heads), `registry` (heads by name,
`load_head`), `train` (the stage-2 run).
"""
