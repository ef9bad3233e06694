"""medsec.defences."""
