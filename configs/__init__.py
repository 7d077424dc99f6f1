"""Service, model, label and split configuration, shipped as package data."""
