"""The training engine: one loop for every stage (engine.py) and what it stands on."""
