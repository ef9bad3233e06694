"""medsec.models."""
