"""The run around the steps: its settings and resume, stop signals, checkpoints and the stability monitor."""
