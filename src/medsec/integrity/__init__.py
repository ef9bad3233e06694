"""medsec.integrity."""
