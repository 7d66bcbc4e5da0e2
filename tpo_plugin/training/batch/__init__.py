"""A TPO step's inputs: the clean and corrupted images of each pair, keyed by the step they train at."""
