"""`make bench`: measured figures for the speed and memory targets, never timed tests."""
