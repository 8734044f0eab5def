"""`make audit`: what is wrong with the data, found in the cached features."""
