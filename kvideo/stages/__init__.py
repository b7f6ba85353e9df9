"""Training stages: what each model of the cascade learns from a batch (see base.Stage)."""
