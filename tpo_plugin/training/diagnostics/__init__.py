"""What TPO weights, per token: views computed with the trainer's own passes, and the token log."""
