"""What stage tpo refuses before the model is loaded, naming the dataset, sample, field or template."""
