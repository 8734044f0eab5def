"""`make review`: a local page to decide on an audit's findings (`server`, `sections`, `files`, `static/`).

The decisions it records live in `pipeline.decisions`, on shared ground, since training reads them too.
"""
