"""medsec.attacks."""
