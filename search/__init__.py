"""The search service: space, data, trainer, objective, study, CLIs."""
