"""medsec.evaluation."""
