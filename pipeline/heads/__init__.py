"""Stage 2, `make head`: light heads on cached features, and the run that trains and evaluates them."""
