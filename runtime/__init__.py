"""Configuration, CLI and (to come) the training runtime."""
