"""medsec.service."""
