"""Datasets: readers of every format, chat rendering, tokenized batches and packing."""
