"""Data: video IO, motion scores, shards and the ShapesWorld toy dataset."""
